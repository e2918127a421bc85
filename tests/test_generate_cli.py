"""`playattention generate` on a finished run: streamed text, sampling options, one-line errors."""
import io

import pytest
import torch

from toolkit.cli import main
from toolkit.generate import load_run, stream_samples
from toolkit.recipe import load_recipe
from toolkit.trainer import train

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("generate")
    path = tiny_recipe(root, {"model.block_size": 16, "model.n_layer": 1, "model.n_embd": 16, "train.max_steps": 3,
                              "train.warmup_steps": 1, "train.eval_batches": 1, "generate.max_new_tokens": 4}, name="gen")
    summary = train(load_recipe(path), run_dir=root / "run", progress=False)
    assert summary["status"] == "finished"
    return root / "run"


def test_generate_prints_the_prompt_and_its_continuation(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 30 + 1  # and a final newline
    assert main(["generate", str(run_dir / "model.safetensors"), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == out  # the weights file names its run; a seed repeats a sample


def test_greedy_generation_is_the_models_argmax(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "KING", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    model, tok, _ = load_run(run_dir)
    idx = torch.tensor([tok.encode("KING")])
    expected = tok.decode(model.generate(idx, 12, temperature=0.0)[0].tolist())
    assert capsys.readouterr().out == expected + "\n"


def test_samples_are_streamed_token_by_token(run_dir):
    model, tok, recipe = load_run(run_dir)

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += 1
            return super().write(s)

    out = Recorder()
    texts = stream_samples(model, tok, ["A", "B"], recipe.generate, num_samples=2, out=out)
    assert len(texts) == 4 and out.writes >= 4 * recipe.generate.max_new_tokens
    assert out.getvalue().count("---------------") == 3


def test_missing_run_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such run folder or weights file\n"


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a finished run folder (missing recipe.toml, model.safetensors" in err


def test_bad_sampling_options_are_one_line_and_exit_2(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "€"]) == 2
    assert "is not in the char tokenizer's vocabulary" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: bad sampling option: must be 0 (greedy) or at least 0.0001")
    for tiny in ("1e-308", "1e-40"):  # logits / temperature would be inf, the softmax NaN
        assert main(["generate", str(run_dir), "--temperature", tiny]) == 2
        assert capsys.readouterr().err.startswith("error: bad sampling option: must be 0 (greedy) or at least 0.0001")
    assert main(["generate", str(run_dir), "--num-samples", "0"]) == 2
    assert capsys.readouterr().err == "error: --num-samples must be at least 1, got 0\n"
