"""Shared test setup: CPU DeepSpeed, few threads, and the one tiny recipe the tests that train start from."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tomli_w  # noqa: E402
import torch  # noqa: E402

# Test models are tiny: one thread beats two (no sync overhead), and 2-rank tests get a core each.
torch.set_num_threads(1)

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """``tiny_recipe(folder, {"train.max_steps": 6, ...}, name="tiny")`` writes ``folder/<name>.toml``:
    tests/recipes/bases/tiny.toml with those dotted-key changes, its runs under ``folder/runs`` and
    its data prepared once per test session (per tokenizer); a change to None leaves the key out.
    Returns the path."""
    data = tmp_path_factory.mktemp("tiny-data")

    def make(folder: Path, changes: dict | None = None, name: str = "tiny") -> Path:
        changes = {k: v for k, v in (changes or {}).items() if v is not None}
        tokenizer = changes.get("data.tokenizer", "char")
        table: dict = {"extends": str(TINY), "name": name,
                       "data": {"prepared_dir": str(data / str(tokenizer))}, "train": {"out_dir": str(folder / "runs")}}
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = table
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = Path(folder) / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(table))
        return path

    return make
