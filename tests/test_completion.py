"""`playattention completion bash|zsh`: commands, recipe files, and --set keys from the recipe schema."""
import shutil
import subprocess

import pytest

from test_layers import ROOT
from toolkit import completion
from toolkit.cli import build_parser, main
from toolkit.plugin_manager import default_registry

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """What `playattention completion bash` prints."""
    path = tmp_path_factory.mktemp("completion") / "playattention.bash"
    path.write_text(completion.script("bash", build_parser(), default_registry()))
    return path


def complete(script, *words: str) -> list[str]:
    """What bash offers for the last word, as a shell calls the function (COMP_WORDS, COMP_CWORD)."""
    call = " ".join(f"'{w}'" for w in ["playattention", *words])
    proc = subprocess.run(["bash", "-c", f"source {script}; COMP_WORDS=({call}); COMP_CWORD={len(words)}; "
                           "_playattention; printf '%s\\n' \"${COMPREPLY[@]}\""],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if ln]


def test_commands_and_their_options_complete(script):
    assert complete(script, "tr") == ["train"]
    assert set(complete(script, "")) >= {"train", "plugins", "recipe", "runs", "completion", "ablate"}
    assert complete(script, "train", "--ini") == ["--init-from"]
    assert complete(script, "recipe", "v") == ["validate"]
    assert complete(script, "completion", "") == ["bash", "zsh"]


def test_recipe_files_complete_after_options_that_take_values(script):
    assert complete(script, "train", "--set", "train.lr=1", "recipes/gpt-c") == ["recipes/gpt-cpu.toml"]
    assert complete(script, "recipe", "copy", "llama-c") == ["llama-cpu"]


def test_set_keys_come_from_the_recipe_schema_and_every_components_options(script):
    keys = complete(script, "train", "recipes/gpt-cpu.toml", "--set", "model.attention.")
    assert {"model.attention.kind=", "model.attention.n_kv_head=", "model.attention.window="} <= set(keys)
    assert "train.max_steps=" in complete(script, "train", "--set", "train.max_")
    assert "data.text_column=" in complete(script, "inspect", "x.toml", "--set", "data.t")


def test_plugins_completes_families_then_their_components(script):
    assert complete(script, "plugins", "att") == ["attention"]
    assert complete(script, "plugins", "norm", "") == ["dyt", "layernorm", "rmsnorm"]


def test_zsh_gets_the_same_function_through_bashcompinit(capsys):
    assert main(["completion", "zsh"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#compdef playattention") and "bashcompinit" in out and "_playattention()" in out
