"""The lm-evaluation-harness adapter, offline: a local multiple-choice task (a YAML file over a local
JSONL) through lm_eval gives the log-likelihoods of the toolkit's own scorer, and the rolling
log-likelihood is the perplexity evaluator's."""
import importlib.metadata as md
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from toolkit.evaluate import EvalContext, evaluate_target, load_target  # noqa: E402
from toolkit.hf import save_hf  # noqa: E402
from toolkit.lm_harness import PlayAttentionLM  # noqa: E402
from toolkit.model import ModelConfig, Transformer  # noqa: E402
from toolkit.plugins.impl.evaluators import MultipleChoice  # noqa: E402
from toolkit.scoring import score_continuations  # noqa: E402

EXAMPLES = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon of Jupiter", "dog"], "label": 0},
    {"ctx": "Paris is the capital of", "endings": ["France.", "bananas"], "label": 1},
    {"ctx": "One, two, three,", "endings": ["four", "seven hundred", "blue"], "label": 2},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small random GPT-2 folder (shipped BPE), the examples as JSONL and a task YAML over them."""
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    folder = root / "gpt2"
    save_hf(Transformer(ModelConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16), None), folder,
            "gpt2")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the json builder is local; never ask the Hub
    return folder, data, tasks


@pytest.mark.slow
def test_loglikelihood_through_lm_eval_matches_the_toolkit_scorer_and_the_hellaswag_evaluator(setup, monkeypatch,
                                                                                              tmp_path):
    folder, data, tasks = setup
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the datasets cache, not the user's
    # only the local task: indexing lm-eval's thousands of task files was most of this test's time
    tasks_here = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(model="playattention", model_args=f"run={folder}", tasks=["tiny_mc"],
                                  task_manager=tasks_here, batch_size=2, device="cpu", log_samples=True)
    model, tok, recipe, _ = load_target(folder)
    for sample in out["samples"]["tiny_mc"]:
        ex = sample["doc"]
        ours = score_continuations(model, [(tok.encode(ex["ctx"]), tok.encode(" " + e)) for e in ex["endings"]],
                                   block_size=16, batch_size=8)
        theirs = [float(ll) for (ll, _greedy), in sample["resps"]]
        assert theirs == pytest.approx([s.logprob for s in ours], abs=1e-4)
    ctx = EvalContext(recipe, None, tok, None, torch.device("cpu"))
    ours = MultipleChoice(MultipleChoice.Options(path=str(data)), ctx)(model)
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(ours["acc"])


def test_rolling_loglikelihood_of_a_text_in_one_window_is_the_perplexity_evaluators(setup, tmp_path):
    # (over several windows lm-eval gives its last window more context than the perplexity windows do)
    folder, _, _ = setup
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times.")
    lm = PlayAttentionLM(run=str(folder), device="cpu", batch_size=4)
    (rolling,) = lm.loglikelihood_rolling([types.SimpleNamespace(args=(text.read_text(),))])
    n = len(lm.tokenizer.encode(text.read_text()))
    assert 1 < n <= 16
    loss = evaluate_target(folder, [f"perplexity:path={text}"])["perplexity/loss"]
    assert rolling == pytest.approx(-loss * n, rel=1e-5)


def test_generate_until_is_greedy_and_stops_at_the_first_stop_string(setup):
    folder, _, _ = setup
    lm = PlayAttentionLM(run=str(folder), device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("Once upon a time")])  # (1, T)
    full = lm.tokenizer.decode(lm.model.generate(ids, 8, temperature=0.0)[0, ids.size(1):].tolist())
    stop = full[len(full) // 2:len(full) // 2 + 2]
    (got,) = lm.generate_until([types.SimpleNamespace(args=("Once upon a time", {"until": [stop], "max_gen_toks": 8}))])
    assert len(full) >= 4 and got == full[:full.find(stop)]


def test_the_package_declares_the_lm_eval_models_entry_point():
    (entry,) = [e for e in md.entry_points(group="lm_eval.models") if e.name == "playattention"]
    assert entry.load() is PlayAttentionLM


def test_python_m_toolkit_lm_harness_is_lm_evals_command_line_with_the_model_registered(monkeypatch):
    """What `python -m toolkit.lm_harness ARGS` hands lm-eval's command line: ARGS, the model, and a
    --device only where none was given (the real run, as docs/training.md writes it, is the test below)."""
    import lm_eval.__main__

    from toolkit import lm_harness

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", sys.argv)  # main sets it for lm-eval: put it back afterwards
    lm_harness.main(["run", "--tasks", "tiny_mc", "--device", "cpu"])
    lm_harness.main(["run", "--tasks", "tiny_mc", "--model=hf"])
    assert seen == [["lm_eval", "run", "--tasks", "tiny_mc", "--device", "cpu", "--model", "playattention"],
                    ["lm_eval", "run", "--tasks", "tiny_mc", "--model=hf", "--device", str(lm_harness.pick_device(None))]]


def docs_block(text: str, start: str, end: str) -> str:
    """The text from the line that begins with ``start`` up to the line that begins with ``end``."""
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith(start))
    last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith(end))
    return "\n".join(lines[first:last])


@pytest.mark.slow
def test_the_documented_lm_eval_command_runs_as_written_on_a_cpu_machine(setup, tmp_path):
    """docs/training.md's command and task file, on a tiny run folder, with no --device: lm-eval's
    default device is cuda:0, which used to fail with "Torch not compiled with CUDA enabled"."""
    import shutil

    from toolkit.convert import hf_to_run
    from toolkit.hf.tokenizers import write_tokenizer_files
    from toolkit.tokenizer import GPT2Tokenizer

    folder, _, _ = setup
    folder = shutil.copytree(folder, tmp_path / "gpt2-hf")
    write_tokenizer_files(GPT2Tokenizer(), folder, 16)  # the run gets GPT-2 BPE, as recipes/gpt2.toml's does
    docs = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    command = docs_block(docs, "python -m toolkit.lm_harness", "```").replace("\\\n", " ")
    assert "runs/gpt2-<time>" in command and "--device" not in command
    hf_to_run(folder, tmp_path / "runs" / "gpt2-tiny")
    # and lm-eval's own options pass through: --output_path writes its results file
    command = command.replace("runs/gpt2-<time>", "runs/gpt2-tiny") + " --output_path out"
    task = docs_block(docs, "task: hellaswag_local", "```")
    (tmp_path / "lm-tasks").mkdir()
    (tmp_path / "lm-tasks" / "hellaswag_local.yaml").write_text(task + "\n")
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "toolkit.lm_harness"]
    proc = subprocess.run([sys.executable, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hellaswag_local" in proc.stdout and "acc_norm" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_a_cuda_device_on_a_machine_without_cuda_runs_on_the_cpu_and_says_so(monkeypatch, capsys):
    from toolkit.lm_harness import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("cuda:0") == torch.device("cpu")
    assert "no CUDA on this machine" in capsys.readouterr().err
    assert pick_device(None) == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
