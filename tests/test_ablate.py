"""Ablation files: both variant forms, grid expansion, budget, validation, dry run, and a tiny grid end to end."""
import datetime
import json
import textwrap

import attrs
import pytest
import torch

from toolkit import ablate, ablation
from toolkit.cli import main
from toolkit.errors import ConfigError
from toolkit.engine import batch_plan
from toolkit.model import Transformer
from toolkit.plugin_manager import default_registry
from toolkit.recipe import load_recipe, registry_of

#: the base recipe of these ablations (changes to tests/recipes/bases/tiny.toml)
BASE = {"name": "tiny", "model.block_size": 16, "model.n_layer": 1, "model.n_embd": 16, "train.micro_batch": 2,
        "train.max_steps": 100, "train.warmup_steps": 10, "train.decay_steps": 80, "train.eval_interval": 50,
        "train.eval_batches": 1, "train.log_interval": 1}

# A component whose forward pass raises on real tensors: it builds and passes validation's shape
# probe on the meta device (so validation and the dry run pass) and fails only once training
# calls it, as a buggy plugin would.
BOOM_PLUGIN = '''\
from torch import nn
from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


class BoomMLP(nn.Module):
    """An MLP that cannot run."""

    Options = NoOptions

    def __init__(self, opts, dims):
        super().__init__()
        self.c_fc = nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x):
        if x.device.type == "meta":  # validation's probe: shapes only
            return x
        raise FloatingPointError("boom: this MLP cannot run")


@hookimpl
def register_components(register):
    register("mlp", "boom", BoomMLP)
'''


@pytest.fixture
def tiny(tmp_path, tiny_recipe):
    """A folder with a tiny base recipe; returns a function writing an ablation file next to it."""
    tiny_recipe(tmp_path, BASE, name="base")

    def write(body: str, name: str = "abl.toml"):
        path = tmp_path / "ablations" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text('recipe = "../base.toml"\n' + textwrap.dedent(body))
        return path

    return write


def errors_of(path, capsys) -> list[str]:
    assert main(["ablate", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    return [ln.removeprefix("error: ") for ln in err.strip().splitlines()]


def test_grid_is_the_cartesian_product_named_after_its_values(tiny):
    path = tiny("""\
        steps = 20
        [grid]
        "model.position.kind" = ["learned", "rope"]
        "model.n_layer" = [1, 2]
        """)
    ab = ablation.parse_ablation(path)
    assert [v.name for v in ab.variants] == ["learned-n_layer=1", "learned-n_layer=2", "rope-n_layer=1", "rope-n_layer=2"]
    assert [o.arg for o in ab.variants[2].overrides] == ['model.position.kind="rope"', "model.n_layer=1"]
    assert ab.baseline == "learned-n_layer=1" and ab.seeds == (1337,)


def test_named_variants_take_a_table_or_an_array_of_overrides_after_the_grid(tiny):
    path = tiny("""\
        steps = 20
        seeds = [1, 2]
        set = ["train.lr=3e-3"]
        baseline = "post"
        [grid]
        "model.mlp.kind" = ["gelu"]
        [[variant]]
        name = "post"
        set = { model.layout = "post", "model.norm" = { kind = "rmsnorm", eps = 1e-6 } }
        [[variant]]
        name = "wide"
        set = ["model.n_embd=32", "model.attention.kind=gqa"]
        """)
    ab, resolved = ablation.load_ablation(path)
    assert [v.name for v in ab.variants] == ["gelu", "post", "wide"]
    post = ab.variants[1]
    assert [(o.key, o.value) for o in post.overrides] == [("model.layout", "post"),
                                                          ("model.norm", {"kind": "rmsnorm", "eps": 1e-6})]
    by_name = {r.variant.name: r.recipe for r in resolved}
    assert by_name["post"].model.block.kind == "post_norm" and by_name["post"].model.norm.kind == "rmsnorm"
    assert by_name["wide"].model.n_embd == 32 and by_name["wide"].model.attention.kind == "gqa"
    assert all(r.train.lr == 3e-3 for r in by_name.values())
    assert ab.seeds == (1, 2) and ab.baseline == "post"


def test_budget_sets_max_steps_and_scales_the_schedule_unless_set_explicitly(tiny):
    path = tiny("""\
        steps = 50
        evals = 5
        [[variant]]
        name = "a"
        [[variant]]
        name = "b"
        set = { "train.eval_interval" = 7 }
        """)
    _, (a, b) = ablation.load_ablation(path)
    assert (a.recipe.train.max_steps, a.recipe.train.warmup_steps, a.recipe.train.decay_steps) == (50, 5, 40)
    assert a.recipe.train.eval_interval == 10 and b.recipe.train.eval_interval == 7
    tokens = tiny("""\
        tokens = 1000
        [[variant]]
        name = "a"
        [[variant]]
        name = "big-batch"
        set = { "train.micro_batch" = 4 }
        """, "tokens.toml")
    _, (a, big) = ablation.load_ablation(tokens)
    assert a.recipe.train.max_steps == 32  # ceil(1000 / (2 * 16))
    assert big.recipe.train.max_steps == 16  # the same tokens in bigger steps
    assert "train.max_steps=16" in big.info.diff


def test_every_problem_in_every_variant_is_reported_at_its_place_with_exit_2(tiny, capsys):
    path = tiny("""\
        steps = 20
        seed = [1]
        set = ["train.max_steps=5"]
        [grid]
        "model.positon.kind" = ["learned", "rope"]
        [[variant]]
        name = "typo"
        set = { "train.lr" = "fast", "model.mlp.kind" = "swiglo" }
        [[variant]]
        name = "opts"
        set = { "model.position" = { kind = "rope", thetaa = 3.0 } }
        """)
    lines = errors_of(path, capsys)
    p = str(path)
    assert lines == [
        f"{p}: $.seed: unknown key; did you mean 'seeds'?",
        f"{p}: $.set[0]: the ablation sets it: use `steps = N` or `tokens = N` at the top of the file",
        f"{p}: variants 'learned', 'rope': $.grid.\"model.positon.kind\": unknown key; did you mean \"model.position.kind\"?",
        f"{p}: variant 'typo': $.variant[0].set.\"model.mlp.kind\": unknown mlp 'swiglo'; did you mean 'swiglu'? "
        "(registered: geglu, gelu, moe, relu, relu2, swiglu)",
        f"{p}: variant 'typo': $.variant[0].set.\"train.lr\": expected float, got \"fast\"",
        f"{p}: variant 'opts': $.variant[1].set.\"model.position\".thetaa: not an option of position 'rope'; "
        "did you mean 'theta'?",
    ]


def test_an_option_of_another_component_and_a_bad_grid_value_name_the_variant(tiny, capsys):
    path = tiny("""\
        steps = 20
        [grid]
        "model.position.kind" = ["learned", "rop"]
        "model.attention.n_kv_head" = [1]
        """)
    lines = errors_of(path, capsys)
    mha_options = ", ".join(f.name for f in attrs.fields(default_registry().get("attention", "mha").options))
    assert lines[0].endswith("all variants: $.grid.\"model.attention.n_kv_head\": unknown key: attention 'mha' has "
                             f"no option 'n_kv_head' (options: {mha_options})")
    assert lines[1].endswith("variant 'rop-n_kv_head=1': $.grid.\"model.position.kind\"[1]: unknown position 'rop'; "
                             "did you mean 'rope'? (registered: alibi, learned, none, rope, sinusoidal)")
    assert len(lines) == 2


def test_file_level_problems_are_reported_together(tiny, capsys):
    path = tiny("""\
        steps = 0
        seeds = [1, 1]
        baseline = "lerned"
        [grid]
        "model.position.kind" = "learned"
        [[variant]]
        name = "learned"
        set = 3
        """)
    lines = [ln.split(": ", 1)[1] for ln in errors_of(path, capsys)]
    assert lines == [
        "$.steps: must be > 0, got 0",
        "$.seeds: repeats a seed: [1, 1]",
        '$.grid."model.position.kind": expected a non-empty array of values, got "learned"',
        '$.variant[0].set: expected a table of "dotted.key" = value or an array of "dotted.key=value", got 3',
        "$.baseline: no variant named 'lerned'; did you mean 'learned'? (variants: learned)",
    ]


def test_dry_run_prints_each_variant_with_parameters_flops_and_differences(tiny, capsys):
    path = tiny("""\
        steps = 20
        baseline = "learned"
        [grid]
        "model.position.kind" = ["learned", "rope"]
        [[variant]]
        name = "gqa"
        set = { "model.attention" = { kind = "gqa", n_kv_head = 1 } }
        """)
    assert main(["ablate", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    _, resolved = ablation.load_ablation(path)
    lines = {ln.split()[0]: ln for ln in out.splitlines()[3:]}
    for r in resolved:
        model = Transformer(r.recipe.model)
        total = model.component_report(16)[-1]
        assert r.info.params == sum(p.numel() for p in model.parameters()) == total["params"]
        assert r.info.flops_per_token == model.flops_per_token(16)
        assert f"{r.info.params:,}" in lines[r.variant.name]
    assert lines["learned"].split()[1] == "*" and lines["learned"].endswith("(baseline)")
    assert lines["rope"].endswith("model.position.kind=rope")
    assert lines["gqa"].endswith("model.attention.kind=gqa, model.attention.n_kv_head=1")
    assert out.startswith("ablation abl: 3 variants x 1 seed = 3 runs of 20 steps")


def test_values_from_tables_travel_through_set_syntax_unchanged():
    from toolkit.recipe import parse_override, toml_inline

    for value in ["rope", 'a "quoted"\nline', 3, 2.5e-4, True, [1, 2], {"kind": "gqa", "n_kv_head": 2}, 1e300,
                  float("inf"), {"a.b": 1, "x y": {"": "z"}}, datetime.date(2026, 12, 7),
                  datetime.datetime(2026, 12, 7, 21, 5, tzinfo=datetime.timezone.utc)]:
        assert parse_override("k=" + toml_inline(value)) == (["k"], value)


def test_last_error_line_finds_the_exception_not_the_progress_bar():
    log = "step 0: loss 4.2\nTraceback (most recent call last):\n  File x\nValueError: bad shape\nrun:  0%|  | 0/10\r"
    assert ablate.last_error_line(log) == "ValueError: bad shape"
    assert ablate.last_error_line("error: data not found\n") == "error: data not found"
    assert ablate.last_error_line("just this\n\n") == "just this"


def test_parallel_runs_get_a_gpu_each_or_a_share_of_the_cores_and_their_own_port(monkeypatch):
    monkeypatch.setattr(ablate.os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    monkeypatch.setenv("RANK", "3")  # as under a launcher: each training run must be its own world
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    a, b = ablate.child_env(0, 3, gpus=[]), ablate.child_env(1, 3, gpus=[])
    assert a["OMP_NUM_THREADS"] == b["OMP_NUM_THREADS"] == "2" and "RANK" not in a
    assert a["MASTER_PORT"] != b["MASTER_PORT"]
    assert ablate.child_env(1, 2, gpus=["4", "5"])["CUDA_VISIBLE_DEVICES"] == "5"
    assert "OMP_NUM_THREADS" not in ablate.child_env(0, 1, gpus=[])  # one run at a time: torch's own default


def test_a_run_without_a_complete_checkpoint_starts_over_instead_of_resuming(tmp_path):
    (tmp_path / "recipe.toml").write_text("")
    (tmp_path / "checkpoints" / "step-0000010").mkdir(parents=True)  # never completed: no manifest
    assert ablate.resume_args(tmp_path) is None
    assert ablate.resume_args(tmp_path / "missing") is None


@pytest.mark.slow
def test_a_tiny_grid_runs_end_to_end_records_a_failure_and_skips_finished_runs_on_rerun(tiny, tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    path = tiny(f"""\
        name = "tiny-e2e"
        steps = 6
        evals = 2
        [[variant]]
        name = "learned"
        [[variant]]
        name = "boom"
        set = {{ plugins = ["{plugin}"], "model.mlp.kind" = "boom" }}
        """)
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "--quiet"]) == 1  # one variant failed
    summary = json.loads((out / "learned-s1337" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    state = json.loads((out / "state.json").read_text())
    assert state["boom-s1337"]["status"] == "failed"
    assert state["boom-s1337"]["error"] == "FloatingPointError: boom: this MLP cannot run"
    md = (out / "report.md").read_text()
    assert "| 1 | **learned** (baseline) |" in md and "boom [failed]" in md
    assert "`boom` seed 1337 (failed): FloatingPointError: boom: this MLP cannot run" in md
    assert (out / "curves.png").is_file() and (out / "results.csv").is_file()
    assert load_recipe(out / "recipes" / "learned-s1337.toml").train.max_steps == 6
    run = out / "learned-s1337"
    assert ablate.resume_args(run) == ["--resume", str(run)]  # its final checkpoint is complete

    mtime = (out / "learned-s1337" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["ablate", str(path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 of 2 runs already finished with the same recipe and plugin code; skipping them: learned-s1337" in captured.out
    assert "start boom-s1337" in captured.out and "start learned" not in captured.out
    assert (out / "learned-s1337" / "summary.json").stat().st_mtime_ns == mtime
    assert "FAILED boom-s1337: FloatingPointError: boom: this MLP cannot run" in captured.out


def test_a_kind_from_one_variants_plugin_does_not_validate_another_variant(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    plugin = tmp_path / "boom.py"
    plugin.write_text(BOOM_PLUGIN)
    path = tiny(f"""\
        steps = 6
        [[variant]]
        name = "with-plugin"
        set = {{ plugins = ["{plugin}"], "model.mlp.kind" = "boom" }}
        [[variant]]
        name = "without"
        set = {{ "model.mlp.kind" = "boom" }}
        """)
    lines = errors_of(path, capsys)
    assert len(lines) == 1 and "variant 'without'" in lines[0] and "unknown mlp 'boom'" in lines[0]


def test_unknown_ablation_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["ablate", str(tmp_path / "nope.toml"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.toml'}: no such ablation file"


def test_shipped_ablations_resolve(capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "recipes" / "ablations"
    files = sorted(root.glob("*.toml"))
    assert {f.stem for f in files} >= {"positions", "attention", "norms", "mlps"}
    for f in files:
        ab, resolved = ablation.load_ablation(f)
        assert len(resolved) == len(ab.variants) * (len(ab.scale.rungs) if ab.scale else 1) >= 3
        # a size sweep's largest rung trains longest (tokens in proportion to its parameters)
        assert all(r.recipe.train.max_steps <= (5000 if ab.scale else 1000) for r in resolved)


def test_a_component_that_cannot_be_built_is_reported_before_anything_runs(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    plugin = tmp_path / "picky.py"
    plugin.write_text(textwrap.dedent('''\
        from torch import nn
        from toolkit.hookspecs import hookimpl
        from toolkit.registry import NoOptions


        class PickyNorm(nn.Module):
            """A norm that only builds for widths divisible by 3."""

            Options = NoOptions

            def __init__(self, opts, dims, dim):
                super().__init__()
                if dim % 3:
                    raise ValueError(f"width {dim} is not divisible by 3")


        @hookimpl
        def register_components(register):
            register("norm", "picky", PickyNorm)
        '''))
    path = tiny(f"""\
        steps = 5
        [[variant]]
        name = "a"
        [[variant]]
        name = "picky"
        set = {{ plugins = ["{plugin}"], "model.norm.kind" = "picky" }}
        """)
    lines = errors_of(path, capsys)
    # recipe validation builds each component (on the meta device) and names the plugin
    assert lines == [f"{path}: variant 'picky': {tmp_path / 'base.toml'}: $.model.norm: norm 'picky' (from picky.py) "
                     f"failed to build: ValueError: width 16 is not divisible by 3"]


def test_plugin_files_in_an_ablation_file_are_relative_to_it_not_the_working_directory(tiny, tmp_path, capsys,
                                                                                        monkeypatch):
    (tmp_path / "ablations" / "plug").mkdir(parents=True)
    (tmp_path / "ablations" / "plug" / "boom.py").write_text(BOOM_PLUGIN)
    path = tiny("""\
        plugins = ["plug/boom.py"]
        steps = 6
        [[variant]]
        name = "gelu"
        [[variant]]
        name = "boom"
        set = { "model.mlp.kind" = "boom" }
        [[variant]]
        name = "boom-again"
        set = { plugins = ["plug/boom.py"], "model.mlp.kind" = "boom", "model.n_layer" = 2 }
        """)
    monkeypatch.chdir(tmp_path.parent)  # somewhere else: the paths must not depend on it
    ab, resolved = ablation.load_ablation(path)
    plugin = str(tmp_path / "ablations" / "plug" / "boom.py")
    assert ab.plugins == (plugin,)
    assert [r.recipe.model.mlp.kind for r in resolved] == ["gelu", "boom", "boom"]
    assert all(plugin in r.recipe.plugins for r in resolved)


def test_an_ablation_file_reads_through_the_recipe_converter(tiny, capsys):
    path = tiny("""\
        steps = "ten"
        evals = 2.5
        seeds = [1, "two"]
        plugin = ["x.py"]
        [[variant]]
        name = "a b"
        sett = {}
        """)
    lines = [ln.split(": ", 1)[1] for ln in errors_of(path, capsys)]
    assert '$.steps: expected int, got "ten"' in lines
    assert "$.evals: expected int, got 2.5" in lines
    assert '$.seeds[1]: expected int, got "two"' in lines
    assert "$.plugin: unknown key; did you mean 'plugins'?" in lines
    assert "$.variant[0].sett: unknown key; did you mean 'set'?" in lines
    assert '$.variant[0].name: expected a name of letters, digits and ._+=,- , got "a b"' in lines


# A component with an options class of its own, in a plugin file the base recipe names: every
# variant's options must be instances of the one class the file defined (it is imported once).
DIFF_PLUGIN = '''\
import attrs
from torch import nn
from toolkit.hookspecs import hookimpl


@attrs.frozen
class DiffOptions:
    scale: float = 1.0


class DiffMLP(nn.Module):
    """An MLP with a scaled output."""

    Options = DiffOptions

    def __init__(self, opts, dims):
        super().__init__()
        self.scale = opts.scale
        self.c_fc = nn.Linear(dims.n_embd, dims.n_embd)
        self.c_proj = nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x):
        return self.c_proj(self.c_fc(x).relu()) * self.scale


@hookimpl
def register_components(register):
    register("mlp", "diff", DiffMLP)
'''


def _plugin_base_ablation(tmp_path, tiny_recipe, steps=6, variants=4):
    """An ablation of the first ``variants`` of half, one, two, three: the plugin file's MLP scale."""
    (tmp_path / "diff.py").write_text(DIFF_PLUGIN)
    tiny_recipe(tmp_path, {**BASE, "plugins": [str(tmp_path / "diff.py")],
                           "model.mlp": {"kind": "diff", "scale": 1.0}}, name="base")
    path = tmp_path / "ablations" / "diff.toml"
    path.parent.mkdir(exist_ok=True)
    blocks = ['[[variant]]\nname = "half"\nset = { "model.mlp.scale" = 0.5 }\n', '[[variant]]\nname = "one"\n',
              '[[variant]]\nname = "two"\nset = { "model.mlp.scale" = 2.0 }\n',
              '[[variant]]\nname = "three"\nset = { "model.mlp.scale" = 3.0 }\n']
    path.write_text(f'recipe = "../base.toml"\nname = "diff-scales"\nsteps = {steps}\nevals = 1\n'
                    + "".join(blocks[:variants]))
    return path


def test_variants_of_a_plugin_files_options_class_resolve_in_one_process(tmp_path, tiny_recipe, capsys, monkeypatch):
    """Regression: with 3+ variants the plugin file was imported again and the options of one import
    were refused by the other ("options must be DiffOptions, got DiffOptions")."""
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    path = _plugin_base_ablation(tmp_path, tiny_recipe)
    assert main(["ablate", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    ab, resolved = ablation.load_ablation(path)
    classes = {type(r.recipe.model.mlp.options) for r in resolved}
    assert len(classes) == 1 and [r.recipe.model.mlp.options.scale for r in resolved] == [0.5, 1.0, 2.0, 3.0]
    for r in resolved:  # each variant builds through its own registry, with the same class
        Transformer(r.recipe.model, registry_of(r.recipe))


@pytest.mark.slow
def test_an_ablation_of_a_plugin_files_options_trains_every_variant(tmp_path, tiny_recipe, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    # two variants: each trains in its own subprocess, so a third or fourth adds nothing this test
    # could catch (3+ variants resolving in one process: test_variants_of_a_plugin_files_options_...)
    path = _plugin_base_ablation(tmp_path, tiny_recipe, steps=2, variants=2)
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "--quiet"]) == 0, capsys.readouterr()
    state = json.loads((out / "state.json").read_text())
    assert sorted(state) == ["half-s1337", "one-s1337"]
    assert {v["status"] for v in state.values()} == {"finished"}

    # one line of the plugin edited: every run trained with the old code is trained again, and said why
    plugin = tmp_path / "diff.py"
    plugin.write_text(plugin.read_text().replace("* self.scale", "* self.scale * 1.0"))
    capsys.readouterr()
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "skipping" not in said and said.count("plugin code changed since it ran") == 2
    assert f"training again half-s1337: plugin code changed since it ran: {plugin}" in said
    assert "trained again, half-s1337: plugin code changed" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["ablate", str(path), "--out", str(out)]) == 0  # nothing changed now: both reused
    assert "2 of 2 runs already finished with the same recipe and plugin code" in capsys.readouterr().out


def test_editing_a_plugin_file_changes_the_fingerprint_of_the_runs_that_load_it(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin file is the project's: it runs without --trust-plugins
    path = _plugin_base_ablation(tmp_path, tiny_recipe)
    ab, resolved = ablation.load_ablation(path)
    before = ablate.plan_jobs(ab, resolved)
    plugin = tmp_path / "diff.py"
    plugin.write_text(plugin.read_text() + "# one more line\n")
    after = ablate.plan_jobs(ab, resolved)
    assert [a.fingerprint != b.fingerprint for a, b in zip(before, after)] == [True] * 4
    seen = {"fingerprint": before[0].fingerprint, "code": before[0].code}
    assert ablate.why_rerun(seen, after[0]).startswith(f"plugin code changed since it ran: {plugin} (")
    assert ablate.why_rerun({"fingerprint": after[0].fingerprint}, after[0]) is None
    assert ablate.why_rerun({"fingerprint": "0" * 16, "code": after[0].code}, after[0]) == "its recipe changed since it ran"


def test_built_in_plugins_count_by_their_module_code_not_only_the_version():
    code = default_registry().code()
    assert code["toolkit.plugins.attention"].startswith("playattention ")
    assert "toolkit.plugins.attention sha256 " in code["toolkit.plugins.attention"]


def test_ablate_set_applies_to_every_variant_and_can_shrink_the_budget(tiny, capsys):
    path = tiny("""\
        steps = 50
        evals = 5
        set = ["train.lr=2e-3"]
        [grid]
        "model.position.kind" = ["learned", "rope"]
        """)
    ab, resolved = ablation.load_ablation(path, ["train.lr=5e-3", "steps=20", "seeds=[7]"])
    assert ab.steps == 20 and ab.seeds == (7,)
    assert [(r.recipe.train.lr, r.recipe.train.max_steps, r.recipe.train.eval_interval) for r in resolved] == \
        [(5e-3, 20, 4), (5e-3, 20, 4)]  # after the file's own set; the schedule scaled to the new budget
    assert main(["ablate", str(path), "--dry-run", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "--set train.lr=-1" in err and err.count("\n") == 1


def test_ablate_writes_plain_lines_not_progress_bar_frames_off_a_terminal(tiny, tmp_path, capsys, monkeypatch):
    """`playattention ablate ... > ablate.log 2>&1`: lines a log can hold, no tqdm frames (carriage returns)."""
    path = tiny("""\
        steps = 2
        [[variant]]
        name = "a"
        """)

    class Exited:  # a training that ends at once, failed: no training happens here
        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return 1

    monkeypatch.setattr(ablate.subprocess, "Popen", Exited)
    ab, resolved = ablation.load_ablation(path)
    ablate.run_ablation(ab, resolved, tmp_path / "out", progress=True)
    captured = capsys.readouterr()
    assert "start a-s1337" in captured.out and "FAILED a-s1337" in captured.out
    assert "\r" not in captured.err + captured.out


# -- size sweeps ([scale]) -------------------------------------------------------------------------
SWEEP = """\
    name = "sweep"
    seeds = [1, 2]
    baseline = "learned"
    [scale]
    widths = [{widths}]
    head_dim = 8
    n_layer = 1
    tokens_per_param = 0.01
    [grid]
    "model.position.kind" = ["learned", "rope"]
    """


def test_a_sweep_runs_every_variant_at_every_rung_with_tokens_in_proportion_to_the_baselines_parameters(tiny, capsys):
    path = tiny(SWEEP.format(widths="16, 32"))
    ab, resolved = ablation.load_ablation(path)
    assert [r.variant.name for r in resolved] == ["learned@w16", "rope@w16", "learned@w32", "rope@w32"]
    by_name = {r.variant.name: r for r in resolved}
    for w in (16, 32):
        base, rope = by_name[f"learned@w{w}"], by_name[f"rope@w{w}"]
        assert base.recipe.model.n_embd == rope.recipe.model.n_embd == w and base.recipe.model.n_head == w // 8
        assert base.recipe.model.n_layer == 1 and rope.info.diff == ("model.position.kind=rope",)  # against its rung
        tokens = 0.01 * base.info.params
        steps = -(-tokens // batch_plan(base.recipe).tokens_per_step)
        assert base.recipe.train.max_steps == rope.recipe.train.max_steps == steps  # the same tokens at a rung
        assert (rope.info.group, rope.info.rung) == ("rope", f"w{w}")
    assert main(["ablate", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ablation sweep: 2 variants x 2 rungs x 2 seeds = 8 runs, tokens = 0.01 x the baseline's "
                          "parameters at each rung; rungs: n_embd in 16, 32; n_head = n_embd / 8; n_layer = 1")
    row = next(ln for ln in out.splitlines() if ln.startswith("rope@w32"))
    r = by_name["rope@w32"]
    tokens = r.recipe.train.max_steps * batch_plan(r.recipe).tokens_per_step
    assert f"{r.info.params:,}" in row and f"{3 * r.info.flops_per_token * tokens:.3g}" in row
    assert "total:" in out.splitlines()[-1]


def test_widening_a_sweep_keeps_the_fingerprints_of_the_rungs_it_had(tiny):
    small = ablate.plan_jobs(*ablation.load_ablation(tiny(SWEEP.format(widths="16, 32"), name="a.toml")))
    wide = ablate.plan_jobs(*ablation.load_ablation(tiny(SWEEP.format(widths="16, 32, 48"), name="a.toml")))
    before = {j.name: j.fingerprint for j in small}
    assert {j.name: j.fingerprint for j in wide if j.name in before} == before
    assert sorted(j.name for j in wide if j.name not in before) == ["learned@w48-s1", "learned@w48-s2",
                                                                    "rope@w48-s1", "rope@w48-s2"]


def test_problems_of_a_scale_table_are_one_line_each_at_their_key(tiny, capsys):
    path = tiny("""\
        steps = 5
        [scale]
        widths = [16, 20, 16]
        head_dim = 8
        n_layer = 1
        aspect = 4
        tokens_per_param = 2
        rungz = 1
        [[variant]]
        name = "a"
        """)
    lines = [ln.split(": ", 1)[1] for ln in errors_of(path, capsys)]
    assert "$.scale.widths: expected distinct positive widths, got [16, 20, 16]" in lines
    assert "$.scale.rungz: unknown key; did you mean 'rung'?" in lines
    path = tiny("""\
        steps = 5
        [scale]
        widths = [16, 20]
        head_dim = 8
        n_layer = 1
        aspect = 4
        tokens_per_param = 2
        [[variant]]
        name = "a"
        """)
    lines = [ln.split(": ", 1)[1] for ln in errors_of(path, capsys)]
    assert lines == ["$.scale.tokens_per_param: give one budget rule: steps, tokens or scale.tokens_per_param",
                     "$.scale.aspect: give the depth as n_layer (fixed) or aspect (n_layer = width / aspect), not both",
                     "$.scale.widths[1]: 20 is not a multiple of head_dim 8"]
    path = tiny("""\
        steps = 5
        [scale]
        widths = [16]
        [[variant]]
        name = "a"
        """)
    assert [ln.split(": ", 1)[1] for ln in errors_of(path, capsys)] == [
        "$.scale: a sweep needs at least 2 rungs (widths = [...] or [[scale.rung]] tables), got 1"]


def test_explicit_rungs_resolve_and_a_rung_the_model_rejects_is_named_once(tiny, capsys):
    path = tiny("""\
        steps = 5
        [[scale.rung]]
        name = "small"
        set = { "model.n_embd" = 16, "model.n_head" = 2 }
        [[scale.rung]]
        name = "odd"
        set = { "model.n_embd" = 18, "model.n_head" = 4 }
        [[variant]]
        name = "a"
        """)
    lines = errors_of(path, capsys)  # once, not also for the rung's overrides on their own
    assert len(lines) == 1 and "variant 'a@odd'" in lines[0] and "n_embd (18) must be divisible by n_head (4)" in lines[0]


@pytest.mark.slow
def test_a_tiny_sweep_trains_fits_and_plots_and_a_rerun_trains_nothing(tiny, tmp_path, capsys):
    path = tiny("""\
        name = "tiny-sweep"
        steps = 4
        evals = 1
        baseline = "learned"
        [scale]
        widths = [16, 32]
        head_dim = 8
        n_layer = 1
        [grid]
        "model.position.kind" = ["learned", "rope"]
        """)
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert (out / "scaling.png").is_file() and "![loss against compute](scaling.png)" in md
    assert "## Scaling: loss against training compute" in md
    assert "| **learned** (baseline) | 2 x 1 | a*C^-b |" in md and "only 2 compute values" in md
    assert "| rope | " in md and "1 seed: no interval" in md
    assert "| **learned@w32** (baseline) |" in md  # the table compares each rung with its own baseline
    capsys.readouterr()
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    assert "4 of 4 runs already finished with the same recipe and plugin code" in capsys.readouterr().out
