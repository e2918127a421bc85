"""Seeded fuzzing of `playattention recipe validate` (the full check, the model built on meta): a few
hundred generated recipes, valid and broken in every way issue 15 lists. Recipes name plugin files
that exit or break their contract, and come with hostile ``--set`` values. A broken one exits 2 with
only ``error:`` lines (one problem each, never split by a newline of its own, at most
MAX_ERROR_LINES + 1) and no traceback; only a valid one exits 0.
"""
import math
import random
import sys
import re
from pathlib import Path

import pytest
import tomli_w

from toolkit import cli, plugin_manager

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"
SEED, CASES = 15, 300

#: (section, key): a generator of valid values, given a random.Random
VALID = {
    ("model", "n_head"): lambda r: r.choice([1, 2, 4]),  # n_embd is 32
    ("model", "dropout"): lambda r: round(r.uniform(0, 0.5), 3),
    ("model", "bias"): lambda r: r.choice([True, False]),
    ("model", "attention"): lambda r: r.choice(["mha", "mqa", {"kind": "gqa", "n_kv_head": 1}, {"kind": "mha",
                                                                                               "backend": "math"}]),
    ("model", "norm"): lambda r: r.choice(["layernorm", "rmsnorm", {"kind": "rmsnorm", "eps": 1e-6}]),
    ("model", "position"): lambda r: r.choice(["learned", "rope", "alibi", {"kind": "rope", "theta": 500.0}]),
    ("model", "mlp"): lambda r: r.choice(["gelu", "relu", "swiglu", {"kind": "gelu", "multiplier": 2.0}]),
    ("train", "lr"): lambda r: 10 ** r.uniform(-4, -1),  # not below min_lr (1e-4)
    ("train", "weight_decay"): lambda r: r.uniform(0, 0.3),
    ("train", "max_steps"): lambda r: r.randint(1, 10**6),  # below warmup: a warning, still valid
    ("train", "seed"): lambda r: r.randint(0, 2**62),
    ("train", "schedule"): lambda r: r.choice(["cosine", "linear", "constant", {"kind": "wsd", "decay_fraction": 0.3}]),
    ("generate", "temperature"): lambda r: r.uniform(0, 2),
    ("generate", "prompts"): lambda r: [r.choice(["\n", "ROMEO:", "a\tb\nc", "é"])],
    ("deepspeed", "config"): lambda r: {"zero_optimization": {"overlap_comm": r.choice([True, False])}},
}
FLOATS = [("train", "lr"), ("train", "min_lr"), ("train", "weight_decay"), ("train", "grad_clip"),
          ("generate", "temperature"), ("model", "dropout"), ("data", "val_fraction")]
INTS = [("model", "n_layer"), ("model", "n_embd"), ("model", "block_size"), ("model", "vocab_size"),
        ("train", "seed"), ("train", "micro_batch"), ("train", "max_steps"), ("generate", "seed")]
OPTION_FLOATS = [("model", "norm", "layernorm", "eps"), ("model", "mlp", "gelu", "multiplier"),
                 ("model", "position", "rope", "theta"), ("model", "position", "sinusoidal", "base"),
                 ("train", "optimizer", "adamw", "eps")]
TOOLKIT_DS = [{"train_batch_size": 7}, {"train_micro_batch_size_per_gpu": 2}, {"gradient_accumulation_steps": 3},
              {"gradient_clipping": 0.5}, {"optimizer": {"type": "Bogus"}}, {"scheduler": {"type": "WarmupLR"}},
              {"zero_optimization": {"stage": 2}}, {"bf16": {"enabled": True}}, {"fp16": {"enabled": False}}]
#: plugin files that break while loading or break their contract (written next to the recipes)
PLUGIN_FILES = {
    "exits0.py": "import sys\nsys.exit(0)\n",
    "exits5.py": "import sys\nsys.exit(5)\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "hook_exits.py": "import sys\nfrom toolkit.hookspecs import hookimpl\n\n@hookimpl\n"
                     "def register_components(register):\n    sys.exit(0)\n",
    "parts.py": """
from torch import nn
from toolkit.hookspecs import hookimpl


class Raises(nn.Module):
    def __init__(self, opts, dims):
        raise RuntimeError("factory broke")


class Wide(nn.Module):
    def __init__(self, opts, dims):
        super().__init__()
        self.up = nn.Linear(dims.n_embd, 3 * dims.n_embd)

    def forward(self, x):
        return self.up(x)


@hookimpl
def register_components(register):
    register("mlp", "fuzz_raises", Raises)
    register("mlp", "fuzz_wide", Wide)
    register("mlp", "fuzz_int", lambda opts, dims: 3)
""",
}
WEIRD = ["a\nb", "tab\there", "nul\0", "\x1b[31mred", "ключ", "", " ", '"quoted"', "x" * 300]


def weird_text(r: random.Random) -> str:
    return r.choice(WEIRD) + str(r.randint(0, 9))


def deep(r: random.Random, depth: int) -> str:
    return ("[" * depth + "]" * depth) if r.random() < 0.5 else ("{a = " * depth + "1" + "}" * depth)


#: every way a recipe is broken here (issue 15's classes)
KINDS = ["type", "nonfinite", "bigint", "deep", "deep_keys", "unknown", "ds_key", "option_nonfinite", "bad_kind",
         "plugins", "extends", "toml_syntax", "too_many", "plugin_file", "contract", "set"]


def mutate(r: random.Random, data: dict, extra: list[str]) -> str:
    """Break ``data`` (or ``extra``, raw TOML appended after it) one way; returns the class of the break."""
    kind = r.choice(KINDS)
    if kind == "type":
        section, key = r.choice(FLOATS + INTS)
        data.setdefault(section, {})[key] = r.choice(["twelve", True, [1, 2], {"a": 1}, weird_text(r)])
    elif kind == "nonfinite":
        section, key = r.choice(FLOATS)
        data.setdefault(section, {})[key] = r.choice([math.inf, -math.inf, math.nan])
    elif kind == "bigint":
        section, key = r.choice(INTS)
        sizes = [2**22 + r.randint(1, 10**9)] if key in ("n_layer", "n_embd", "block_size", "vocab_size",
                                                         "micro_batch") else []  # only a size has a sane bound
        data.setdefault(section, {})[key] = r.choice([2**63, 10**30, -2**70, *sizes])
    elif kind == "deep":
        extra.append(f"[fuzz_deep]\nv = {deep(r, r.randint(33, 700))}\n")
    elif kind == "deep_keys":
        extra.append(".".join(["k"] * r.randint(33, 450)) + " = 1\n")
    elif kind == "unknown":
        section = r.choice(["model", "train", "data", "generate", "deepspeed"])
        for _ in range(r.randint(1, 3)):
            data.setdefault(section, {})[weird_text(r)] = r.choice([1, "x", [1]])
    elif kind == "ds_key":
        data.setdefault("deepspeed", {}).setdefault("config", {}).update(r.choice(TOOLKIT_DS))
    elif kind == "option_nonfinite":
        section, family, kind_name, option = r.choice(OPTION_FLOATS)
        data.setdefault(section, {})[family] = {"kind": kind_name, option: r.choice([math.inf, math.nan])}
    elif kind == "bad_kind":
        family = r.choice(["attention", "norm", "position", "mlp", "block"])
        data.setdefault("model", {})[family] = r.choice([weird_text(r), {"kind": 3}, {"nokind": "x"}, 7])
    elif kind == "plugins":
        data["plugins"] = r.choice([[weird_text(r) + ".py"], "not-an-array", [1, 2], ["no_such_module_" + str(r.random())],
                                    ["m"] * 500])
    elif kind == "extends":
        extra.append("")  # replaces the whole extends line below
        data["__extends__"] = r.choice(["no-such-base.toml", 3, ["a"], weird_text(r)])
    elif kind == "toml_syntax":
        extra.append(r.choice(["[model\n", "x = \n", "= 1\n", "a = [1,\n", '"unterminated\n', "\x00\n",
                               "[model]\nn_layer = 1\n[model]\n"]))
    elif kind == "too_many":
        data.setdefault("model", {}).update({f"junk_{i}": i for i in range(r.randint(60, 400))})
    elif kind == "plugin_file":
        data["plugins"] = [r.choice(["exits0.py", "exits5.py", "interrupts.py", "hook_exits.py"])]
    elif kind == "contract":
        data["plugins"] = ["parts.py"]
        data.setdefault("model", {})["mlp"] = r.choice(["fuzz_raises", "fuzz_wide", "fuzz_int"])
    elif kind == "set":
        key = r.choice(["model.n_head", "train.lr", "generate.temperature", "model.position.theta", "train.seed"])
        big = [str(2**70)] if key in ("model.n_head", "train.seed") else []  # a float that large is finite
        data.setdefault("__set__", []).append(f"{key}=" + r.choice(
            ["inf", "nan", "-inf", deep(r, r.randint(33, 1000)), *big, '"x\ny"', "[1, 2]"]))
    return kind


def recipe_text(data: dict, extra: list[str]) -> str:
    data.pop("__set__", None)
    extends = data.pop("__extends__", str(TINY))
    head = f"extends = {tomli_w.dumps({'x': extends})[4:]}" if not isinstance(extends, str) else \
        tomli_w.dumps({"extends": extends})
    return head + tomli_w.dumps(data) + "".join(extra)


def cases():
    r = random.Random(SEED)
    out = []
    for i in range(CASES):
        data: dict = {"name": f"fuzz{i}"}
        for _ in range(r.randint(0, 4)):  # valid changes first
            (section, key), make = r.choice(list(VALID.items()))
            data.setdefault(section, {})[key] = make(r)
        extra: list[str] = []
        broken = [mutate(r, data, extra) for _ in range(r.choice([0, 0, 1, 1, 1, 2, 3]))]
        sets = [arg for s in data.get("__set__", []) for arg in ("--set", s)]
        out.append((recipe_text(data, extra), sets, broken))
    return out


LINE = re.compile(r"^error: (\S.*?)(:\d+:\d+)?: ")


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")  # error lines only, whatever ran before
    yield
    plugin_manager.forget_loaded()


def test_every_generated_recipe_is_accepted_or_refused_in_clean_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, source in PLUGIN_FILES.items():
        (tmp_path / name).write_text(source)
    seen_valid = seen_broken = 0
    generated = cases()
    assert {kind for _, _, broken in generated for kind in broken} == set(KINDS)  # every class, several times
    for n, (text, sets, broken) in enumerate(generated):
        path = tmp_path / f"fuzz{n}.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        code = cli.main(["recipe", "validate", path.name, *sets])
        out, err = capsys.readouterr()
        where = f"case {n} {broken} {sets}:\n{text[:2000]}\n--- stderr:\n{err[:3000]}"
        assert "Traceback" not in err + out, where
        lines = err.splitlines()
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert all(ln.startswith(("error: ", "warning: ")) for ln in lines), where
        assert all(not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", ln) for ln in lines), where
        if not broken:
            assert code == 0 and not errors, where
            seen_valid += 1
            continue
        seen_broken += 1
        assert code == 2 and 1 <= len(errors) <= cli.MAX_ERROR_LINES + 1, where
        assert all(LINE.match(ln) or ln.startswith(("error: ... and ", "error: --set ")) for ln in errors), where
        assert out == "", where
    assert seen_valid >= CASES // 5 and seen_broken >= CASES // 2


# -- issue 19's classes: DeepSpeed config values, sizes beyond the machine, degenerate widths,
# plugins raising BaseException; each case is classified, so the counts say how far from clean it is
DS_HOSTILE = [
    {"zero_optimization": {"reduce_bucket_size": -5}}, {"zero_optimization": {"overlap_comm": "maybe"}},
    {"communication_data_type": "fp8"}, {"steps_per_print": "often"},
    {"elasticity": {"enabled": True, "max_train_batch_size": "lots"}}, {"elasticity": 3},
    {"data_types": {"grad_accum_dtype": "int8"}}, {"aio": {"block_size": "big"}},
    {"zero_optimizaton": {"overlap_comm": True}}, {"zero_optimization": {"allgather_bucket_size": -1}},
    {"zero_optimization": {"reduce_scatter": "perhaps"}}, {"wall_clock_breakdown": "yes"},
    {"zero_optimization": {"stage3_max_live_parameters": -1}}, {"activation_checkpointing": {"number_checkpoints": "x"}},
    {"flops_profiler": {"profile_step": "x"}}, {"zero_optimization": {"overlap_comms": True}},
]
DS_VALID = [{"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 50_000_000}}, {"steps_per_print": 100},
            {"communication_data_type": "fp32"}, {"data_types": {"grad_accum_dtype": "fp32"}},
            {"zero_optimization": {"reduce_scatter": "yes"}}]  # DeepSpeed's pydantic models read "yes" as true
SIZES = ["[model]\nn_layer = 1024\nn_embd = 65536\nn_head = 512\n",
         "[model.mlp]\nkind = \"gelu\"\nhidden_dim = 2147483648\n",
         "[model.mlp]\nkind = \"gelu\"\nhidden_dim = 1099511627776\n",
         "[model]\nvocab_size = 4194304\nn_embd = 65536\nn_head = 512\n",
         "[model]\nhead_dim = 1048576\nn_head = 64\n",
         "[model.mlp]\nkind = \"moe\"\nexperts = 100000\n"]
DEGENERATE = ["[model.mlp]\nkind = \"gelu\"\nmultiplier = 1e-9\n", "[model.mlp]\nkind = \"relu\"\nmultiplier = 0.01\n",
              "[model.attention]\nkind = \"mla\"\nrope_dim = 3\n", None, "# only a comment\n"]
BASE_EXC = {"genexit.py": "raise GeneratorExit\n",
            "custom_base.py": "class Boom(BaseException):\n    pass\n\nraise Boom('at import')\n",
            "hook_base.py": "from toolkit.hookspecs import hookimpl\n\nclass Boom(BaseException):\n    pass\n\n"
                            "@hookimpl\ndef register_components(register):\n    raise Boom('in the hook')\n",
            "latin1.py": "# caf\xe9\nNAME = 'caf\xe9'\n",
            "latin1_cookie.py": "# -*- coding: latin-1 -*-\nNAME = 'caf\xe9'\n"}


def hostile_cases():
    """(id, recipe text, command, whether it must be refused: True, False, or None for either)."""
    head = f'extends = "{TINY}"\n'
    out = [(f"ds-{i}", head + tomli_w.dumps({"deepspeed": {"config": c}}), "inspect", True)
           for i, c in enumerate(DS_HOSTILE)]
    out += [(f"ds-valid-{i}", head + tomli_w.dumps({"deepspeed": {"config": c}}), "inspect", False)
            for i, c in enumerate(DS_VALID)]
    out += [(f"size-{i}", head + body, "train", True) for i, body in enumerate(SIZES)]
    out += [(f"size-show-{i}", head + body, "recipe", None) for i, body in enumerate(SIZES)]  # fast, either way
    out += [(f"degenerate-{i}", "" if body is None else (head + body if body.startswith("[") else body), "recipe", True)
            for i, body in enumerate(DEGENERATE)]
    out += [(f"plugin-{name}", head + tomli_w.dumps({"plugins": [name]}), "recipe", True) for name in BASE_EXC]
    return out


class _Hang(BaseException):
    """Raised by the alarm when one case runs past its time."""


def classify(tmp_path, case_id, text, command, refuse, capsys) -> str:
    """clean / traceback / hang / wrongly accepted / wrongly refused for one case, run in this process."""
    import resource
    import signal

    path = tmp_path / f"{case_id}.toml"
    path.write_bytes(text.encode())
    argv = {"inspect": ["inspect", path.name], "recipe": ["recipe", "validate", path.name],
            "train": ["train", path.name, "--run-dir", f"run-{case_id}", "--set", "train.max_steps=1"]}[command]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:  # a size that slips through must fail to allocate, not fill the machine
        vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Hang()))
    signal.alarm(30 if command == "train" else 15)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 30), hard))
        code = cli.main(argv)
    except _Hang:
        code = "hang"
    except BaseException as exc:  # noqa: BLE001 - escaping main at all is a traceback
        code = f"raised {type(exc).__name__}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    out, err = capsys.readouterr()
    print(f"{case_id}: exit {code}: {(err.strip().splitlines() or [''])[-1][:300]}", file=sys.__stderr__)
    if code == "hang":
        return "hang"
    if isinstance(code, str) or "Traceback" in out + err:
        return "traceback"
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    if refuse is None:
        refuse = code != 0
    if refuse:
        if code == 0:
            return "wrongly accepted"
        lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
        return "clean" if code == 2 and lines == errors and 1 <= len(errors) <= 3 else "traceback"
    return "clean" if code == 0 and not errors else "wrongly refused"


def hostile_counts(tmp_path, capsys, monkeypatch) -> tuple[dict, dict]:
    monkeypatch.chdir(tmp_path)
    for name, source in BASE_EXC.items():  # latin-1 bytes, but the one whose coding line makes Python read them so
        (tmp_path / name).write_bytes(source.encode("utf-8" if "cookie" in name else "latin-1"))
    results = {case_id: classify(tmp_path, case_id, text, command, refuse, capsys)
               for case_id, text, command, refuse in hostile_cases()}
    counts: dict = {}
    for outcome in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts, results


@pytest.mark.slow
def test_issue19_hostile_classes_are_each_accepted_or_refused_in_one_clean_line(tmp_path, capsys, monkeypatch):
    counts, results = hostile_counts(tmp_path, capsys, monkeypatch)
    print(counts)
    assert {k: v for k, v in results.items() if v != "clean"} == {}
