"""The built-in evaluators: the continuation scorer by hand, hellaswag and perplexity during training
(metrics.jsonl, summary, plot) and after it (`playattention eval` on a run and on a GPT-2 folder)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.cli import main
from toolkit.errors import ConfigError, DataError
from toolkit.evaluate import EvalContext
from toolkit.hf import save_hf
from toolkit.model import ModelConfig, Transformer
from toolkit.plots import losses_figure
from toolkit.plugin_manager import default_registry
from toolkit.plugins.impl.evaluators import MultipleChoice, Windows, read_examples
from toolkit.recipe import Recipe, load_recipe
from toolkit.scoring import score_continuations
from toolkit.tokenizer import ASSETS, GPT2Tokenizer
from toolkit.trainer import train

# A Shakespeare-flavoured multiple-choice file (the tiny recipe's char tokenizer knows these characters)
EXAMPLES = [
    {"ctx": "ROMEO: What say you", "endings": ["to this, my lord?", "zzqq xq jj"], "label": 0},
    {"ctx": "KING HENRY:", "endings": ["qqqq zzz", "My lord, the day is ours."], "label": 1},
    {"ctx": "First Citizen:", "endings": ["Speak, speak.", "xq zq jq", "qz"], "label": 0},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the scorer, by hand ---------------------------------------------------------------------------
P = torch.tensor([0.5, 0.25, 0.125, 0.125])  # the stub model's next-token distribution at every position


def stub_model(idx):
    """Every position predicts P, whatever came before."""
    return (P.log().expand(*idx.shape, 4),)  # (B, T, V)


class StubTokenizer:
    """' ' -> 0, 'a' -> 1, 'b' -> 2, 'c' -> 3."""

    name, eot = "stub", None
    chars = " abc"

    def encode(self, text):
        return [self.chars.index(c) for c in text]


def test_scorer_sums_the_continuation_log_probs_and_crops_the_context_from_the_left():
    got = score_continuations(stub_model, [([1, 2], [0, 1]), ([1] * 50, [3, 3, 3])], block_size=8, batch_size=2)
    assert got[0].logprob == pytest.approx(math.log(0.5) + math.log(0.25)) and got[0].tokens == 2
    assert got[1].loss == pytest.approx(3 * math.log(8)) and got[1].tokens == 3
    assert got[0].greedy is False and score_continuations(stub_model, [([1], [0, 0])], block_size=4,
                                                          batch_size=1)[0].greedy is True


def test_hellaswag_picks_the_ending_with_the_lowest_mean_completion_loss_and_acc_by_the_sum(tmp_path):
    # " " + ending: "b" -> [0, 2]; "   a" -> [0, 0, 0, 0, 1]; "cc" -> [0, 3, 3]
    sums = [math.log(2) + math.log(8), 4 * math.log(2) + math.log(4), math.log(2) + 2 * math.log(8)]
    means = [sums[0] / 2, sums[1] / 5, sums[2] / 3]
    assert min(range(3), key=sums.__getitem__) == 0 and min(range(3), key=means.__getitem__) == 1
    path = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "ab", "endings": ["b", "   a", "cc"], "label": 1}])
    ctx = EvalContext(Recipe(), default_registry(), StubTokenizer(), None, torch.device("cpu"))
    scorer = MultipleChoice(MultipleChoice.Options(path=str(path)), ctx)
    assert scorer(stub_model) == {"acc": 0.0, "acc_norm": 1.0}  # label 1: the lowest mean, not the lowest sum
    write_jsonl(path, [{"ctx": "ab", "endings": ["b", "   a", "cc"], "label": 0}])
    assert MultipleChoice(MultipleChoice.Options(path=str(path)), ctx)(stub_model) == {"acc": 1.0, "acc_norm": 0.0}


def test_perplexity_windows_score_every_token_but_the_first_once():
    windows = Windows([np.arange(10), np.arange(100, 103)], block_size=4)
    scored = [t for i in range(len(windows)) for t in windows[i][1]]
    assert scored == [*range(1, 10), 101, 102]
    assert len(Windows([np.arange(10)], block_size=4, limit=2)) == 2


def test_a_bad_line_of_a_multiple_choice_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [EXAMPLES[0], {"ctx": "x", "endings": ["a", "b"], "label": 2}])
    with pytest.raises(DataError, match=r"mc.jsonl:2: expected \"label\" to be an index into the 2 endings"):
        read_examples(path)
    assert len(read_examples(write_jsonl(path, EXAMPLES), limit=2)) == 2


def test_a_missing_evaluator_file_is_a_one_line_recipe_error(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path, {"eval": [{"kind": "hellaswag", "path": "nope/hellaswag_val.jsonl"},
                                             {"kind": "perplexity", "path": "missing.txt"}]})
    with pytest.raises(ConfigError) as exc:
        load_recipe(recipe)
    assert exc.value.lines == [f"{recipe}: $.eval[0].path: no such file: nope/hellaswag_val.jsonl",
                               f"{recipe}: $.eval[1].path: no such file: missing.txt"]


# -- during training, and after it --------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_recipe):
    folder = tmp_path_factory.mktemp("evaluators")
    mc = write_jsonl(folder / "mc.jsonl", EXAMPLES)
    recipe = tiny_recipe(folder, {"train.max_steps": 4, "train.eval_interval": 2, "eval": [
        {"kind": "hellaswag", "path": str(mc)}, {"kind": "perplexity", "batches": 2}]})
    summary = train(load_recipe(recipe), progress=False)
    assert summary["status"] == "finished", summary
    return summary, mc


def test_training_logs_the_evaluators_in_metrics_summary_and_plot(run):
    summary, _ = run
    run_dir = summary["run_dir"]
    evals = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if '"eval"' in line]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0 <= r["hellaswag/acc"] <= 1 and 0 <= r["hellaswag/acc_norm"] <= 1
        assert r["perplexity/ppl"] == pytest.approx(math.exp(r["perplexity/loss"]))
        assert abs(r["perplexity/loss"] - r["val_loss"]) < 0.2  # the same split, other windows
    assert summary["hellaswag/acc_norm"] == evals[-1]["hellaswag/acc_norm"]
    titles = [ax.get_title() for ax in losses_figure(f"{run_dir}/metrics.jsonl").axes]
    assert f"hellaswag/acc_norm ({evals[-1]['hellaswag/acc_norm']:.4f})" in titles
    assert f"perplexity/ppl ({evals[-1]['perplexity/ppl']:.4f})" in titles


def test_eval_command_reruns_the_runs_evaluators_and_takes_tasks_with_options(run, tmp_path, capsys):
    summary, mc = run
    assert main(["eval", summary["run_dir"], "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "hellaswag   acc_norm" in table
    saved = json.loads((tmp_path / "r.json").read_text())["results"]
    assert saved["hellaswag/acc_norm"] == pytest.approx(summary["hellaswag/acc_norm"])
    assert saved["perplexity/loss"] == pytest.approx(summary["perplexity/loss"], rel=1e-5)
    assert main(["eval", summary["run_dir"], "--task", f"hellaswag:path={mc},limit=2", "--json", "-"]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"]) == {"hellaswag/acc", "hellaswag/acc_norm"}
    assert main(["eval", summary["run_dir"], "--task", "hellaswag:path=x.jsonl,limt=2"]) == 2
    assert capsys.readouterr().err == ("error: --task hellaswag.limt: not an option of evaluator 'hellaswag'; "
                                       "did you mean 'limit'?\n")


def test_eval_command_scores_a_hugging_face_gpt2_folder_with_its_own_bpe_files(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16), None)
    folder = tmp_path / "gpt2"
    save_hf(model, folder, "gpt2")
    shutil.copy(ASSETS / "gpt2" / "encoder.json", folder / "vocab.json")
    shutil.copy(ASSETS / "gpt2" / "vocab.bpe", folder / "merges.txt")
    text = tmp_path / "t.txt"
    text.write_text("Hello, I'm a language model, and I like tokens.")
    assert main(["eval", str(folder), "--task", f"perplexity:path={text}", "--json", "-"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]["perplexity/loss"]
    ids = torch.tensor([[50256, *GPT2Tokenizer().encode(text.read_text())]])  # a document starts with <|endoftext|>
    logits, _ = model.eval()(ids[:, :-1])
    assert got == pytest.approx(F.cross_entropy(logits[0], ids[0, 1:]).item(), rel=1e-5)
