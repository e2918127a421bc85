"""What generate, eval and convert --to hf read: a finished run, any checkpoint of it (RUN@step-N,
RUN@latest, RUN@best, the checkpoint's folder), a folder convert --to hf wrote, and a Hugging Face
folder of another architecture, each with its own tokenizer; train.keep_best keeps the best checkpoint."""
import json

import pytest
import torch

from toolkit import checkpoint, runfolder
from toolkit.cli import main
from toolkit.evaluate import evaluate_target
from toolkit.hf.tokenizers import char_tokenizer_json
from toolkit.recipe import load_recipe
from toolkit.tokenizer import CharTokenizer
from toolkit.trainer import train

HELDOUT = "ROMEO:\nWhat say you, friar? Is it not so?\nJULIET:\nIt is, it is.\n" * 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_recipe):
    """4 steps, evaluated and checkpointed every 2, keeping one checkpoint and the best."""
    root = tmp_path_factory.mktemp("sources")
    path = tiny_recipe(root, {"model.block_size": 16, "model.n_layer": 1, "model.n_embd": 16, "train.max_steps": 4,
                              "train.warmup_steps": 1, "train.eval_batches": 1, "train.eval_interval": 2,
                              "train.checkpoint_interval": 2, "train.keep_checkpoints": 1, "train.keep_best": True,
                              "generate.max_new_tokens": 4}, name="src")
    summary = train(load_recipe(path), run_dir=root / "run", progress=False)
    assert summary["status"] == "finished"
    return root / "run"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(HELDOUT)
    return path


def ppl(target, heldout) -> float:
    return evaluate_target(str(target), [f"perplexity:path={json.dumps(str(heldout))}"])["perplexity/loss"]


def test_eval_of_the_folder_convert_to_hf_wrote_equals_eval_of_the_run(run_dir, heldout, tmp_path, capsys):
    assert main(["convert", str(run_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    # it used to tokenize with GPT-2 BPE, ids past the char vocabulary: IndexError
    assert main(["eval", str(tmp_path / "hf"), "--task", f"perplexity:path={heldout}"]) == 0
    assert ppl(tmp_path / "hf", heldout) == pytest.approx(ppl(run_dir, heldout), abs=1e-5)


def test_a_random_transformers_llama_folder_evaluates_and_generates(tmp_path, heldout, capsys):
    transformers = pytest.importorskip("transformers")
    tok = CharTokenizer.from_text(HELDOUT)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(tok)))
    assert main(["eval", str(tmp_path / "llama"), "--task", f"perplexity:path={heldout}"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "llama"), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_every_form_of_a_checkpoint_generates_evaluates_and_converts(run_dir, heldout, tmp_path, capsys):
    ckpts = run_dir / "checkpoints"
    best = checkpoint.best_checkpoint(ckpts)
    forms = [f"{run_dir}@latest", f"{run_dir}@best", f"{run_dir}@{best.name}", f"{run_dir}@step-{checkpoint.step_of(best)}",
             str(best)]
    for form in forms:  # the folder form used to say "not a finished run folder"
        assert main(["generate", form, "--max-new-tokens", "3", "--temperature", "0"]) == 0, form
        assert main(["eval", form, "--task", f"perplexity:path={heldout}"]) == 0, form
        assert main(["convert", form, str(tmp_path / form.replace("/", "_")), "--to", "hf"]) == 0, form
    # the final checkpoint holds the weights the run exported
    assert ppl(f"{run_dir}@latest", heldout) == pytest.approx(ppl(run_dir, heldout), abs=1e-6)


def test_a_checkpoint_that_is_not_there_is_one_line_naming_those_that_are(run_dir, capsys):
    assert main(["generate", f"{run_dir}@step-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "@step-3: no such checkpoint" in err and "complete ones: step-" in err
    assert main(["eval", f"{run_dir}@soon", "--task", "perplexity"]) == 2
    assert "after @ give latest, best or step-N" in capsys.readouterr().err


def test_keep_best_keeps_the_lowest_val_loss_beside_the_newest_and_says_which(run_dir):
    ckpts = run_dir / "checkpoints"
    best = checkpoint.best_checkpoint(ckpts)
    kept = checkpoint.list_checkpoints(ckpts)
    assert kept[-1].name == "step-0000004" and best in kept and len(kept) <= 2  # keep_checkpoints = 1, + the best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_checkpoint"] == str(best)


def fake_checkpoint(root, step: int, val_loss: float):
    path = root / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    state = {"step": step, "world_size": 1, "zero_stage": 0, "files": {},
             "last_eval": {"step": step, "val_loss": val_loss}}
    (path / checkpoint.STATE_FILE).write_text(json.dumps(state))
    return path


def test_pruning_never_deletes_the_best_checkpoint_with_keep_best(tmp_path):
    early = fake_checkpoint(tmp_path, 2, 1.5)  # the best, and the oldest
    fake_checkpoint(tmp_path, 4, 1.9)
    fake_checkpoint(tmp_path, 6, 2.4)
    checkpoint.prune(tmp_path, 6, keep=1, keep_best=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000002", "step-0000006"]
    assert checkpoint.best_checkpoint(tmp_path) == early
    checkpoint.prune(tmp_path, 6, keep=1)  # without keep_best: only the newest
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000006"]


@pytest.mark.slow
def test_a_zero2_bf16_checkpoint_gives_the_fp32_master_weights_the_run_exported(tmp_path, tiny_recipe):
    """ZeRO 1-3 keep fp32 master weights in the optimizer partitions (the module holds bf16 copies):
    joined on the CPU, read weights-only, they are bitwise the export's."""
    from safetensors.torch import load_file

    path = tiny_recipe(tmp_path, {"model.block_size": 16, "model.n_layer": 1, "model.n_embd": 16, "train.max_steps": 2,
                                  "train.warmup_steps": 1, "train.eval_batches": 1, "deepspeed.zero_stage": 2,
                                  "deepspeed.precision": "bf16", "generate.max_new_tokens": 2}, name="z2")
    assert train(load_recipe(path), run_dir=tmp_path / "run", progress=False)["status"] == "finished"
    weights = checkpoint.checkpoint_weights(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    exported = load_file(str(tmp_path / "run" / runfolder.WEIGHTS))
    assert exported and all(torch.equal(weights[k], v) for k, v in exported.items())
