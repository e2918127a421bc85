"""Recipes: the shipped ones, extends, --set, plugins, round trips through `recipe show`."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from toolkit import plugin_manager
from toolkit.converter import resolve_specs, structure
from toolkit.errors import ConfigError
from toolkit.families import components
from toolkit.model import ModelConfig
from toolkit.plugin_manager import get_registry
from toolkit.recipe import Recipe, dump_recipe, load_recipe, parse_override, resolve_data

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))
TINY = ROOT / "tests" / "recipes" / "bases" / "tiny.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(*args, **kwargs)
    return info.value.lines


# -- shipped recipes ------------------------------------------------------------------------------
def test_every_shipped_recipe_is_found():
    assert {p.stem for p in SHIPPED} >= {"gpt", "gpt-cpu", "gpt2", "llama", "smoke"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_survives_a_round_trip_through_recipe_show(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    saved = write(tmp_path / "run" / "recipe.toml", dump_recipe(recipe))
    assert load_recipe(saved) == recipe
    assert load_recipe(saved.parent) == recipe  # a run folder stands for its recipe.toml


def test_gpt_cpu_is_the_lecture_gpt_shrunk_for_two_cores():
    r = load_recipe(ROOT / "recipes" / "gpt-cpu.toml")
    m, t = r.model, r.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.dropout) == (4, 4, 128, 64, 65, 0.0)
    assert (t.micro_batch, t.max_steps, t.eval_interval, t.eval_batches, t.lr) == (12, 2000, 250, 20, 1e-3)
    # inherited from gpt.toml
    assert (t.min_lr, t.warmup_steps, t.betas, t.weight_decay) == (1e-4, 100, (0.9, 0.99), 0.1)
    assert r.data.tokenizer.kind == "char" and r.data.dataset == "tinyshakespeare"
    assert r.description != load_recipe(ROOT / "recipes" / "gpt.toml").description


def test_gpt_is_the_lecture_model_with_nanogpt_shakespeare_char_settings():
    r = load_recipe(ROOT / "recipes" / "gpt.toml")
    m, t = r.model, r.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size) == (6, 6, 384, 256, 0.2, 65)
    assert (t.micro_batch, t.lr, t.min_lr, t.max_steps, t.warmup_steps) == (64, 1e-3, 1e-4, 5000, 100)
    assert (t.eval_interval, t.eval_batches, t.betas, t.weight_decay) == (250, 200, (0.9, 0.99), 0.1)
    assert r.deepspeed.precision == "fp32"


def test_gpt2_is_124m_with_half_a_million_tokens_per_step():
    r = load_recipe(ROOT / "recipes" / "gpt2.toml")
    m, t, ds = r.model, r.train, r.deepspeed
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50304)
    assert t.tokens_per_step == 524288 and t.tokens_per_step % (t.micro_batch * m.block_size) == 0
    assert (t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.schedule.kind) == (6e-4, 6e-5, 715, 19073, "cosine")
    assert (t.weight_decay, t.betas, t.grad_clip, t.compile) == (0.1, (0.9, 0.95), 1.0, True)
    assert (ds.precision, ds.zero_stage) == ("bf16", 1)
    assert (r.data.tokenizer.kind, r.data.dataset, r.data.prepared_dir) == ("gpt2", "fineweb-edu", "data/fineweb-edu")


def test_llama_swaps_in_the_llama_components_and_keeps_gpt2s_budget():
    r, base = load_recipe(ROOT / "recipes" / "llama.toml"), load_recipe(ROOT / "recipes" / "gpt2.toml")
    m = r.model
    kinds = (m.attention.kind, m.norm.kind, m.position.kind, m.mlp.kind)
    assert kinds == ("gqa", "rmsnorm", "rope", "swiglu")
    assert m.attention.options.n_kv_head == 4 and not m.bias and not m.tie_embeddings
    assert r.train == base.train and r.data == base.data and r.deepspeed == base.deepspeed


def test_smoke_recipe_is_tiny():
    r = load_recipe(ROOT / "recipes" / "smoke.toml")
    m, t = r.model, r.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (2, 2, 32, 32)
    assert (t.micro_batch, t.max_steps, t.eval_interval, t.eval_batches) == (4, 20, 10, 2)


# -- extends --------------------------------------------------------------------------------------
def test_extends_merges_tables_and_replaces_arrays_and_scalars(tmp_path):
    write(tmp_path / "base.toml", """
        name = "base"
        description = "the base"
        [model]
        n_layer = 2
        n_head = 2
        n_embd = 32
        block_size = 32
        [generate]
        prompts = ["a", "b"]
        top_k = 5
    """)
    child = write(tmp_path / "child.toml", """
        extends = "base.toml"
        [model]
        n_layer = 3
        [generate]
        prompts = ["c"]
    """)
    r = load_recipe(child)
    assert (r.model.n_layer, r.model.n_head, r.model.n_embd) == (3, 2, 32)  # table merged
    assert r.generate.prompts == ["c"] and r.generate.top_k == 5  # array replaced, sibling kept
    assert (r.name, r.description) == ("child", "")  # they describe one file: not inherited


def test_extends_chains_and_resolves_each_base_relative_to_the_file_naming_it(tmp_path):
    write(tmp_path / "a" / "grand.toml", "[train]\nseed = 1\nlr = 0.01\n")
    write(tmp_path / "a" / "b" / "parent.toml", 'extends = "../grand.toml"\n[train]\nseed = 2\n')
    child = write(tmp_path / "c" / "child.toml", 'extends = "../a/b/parent.toml"\n[train]\nmax_steps = 300\n')
    t = load_recipe(child).train
    assert (t.seed, t.lr, t.max_steps) == (2, 0.01, 300)


def test_changing_kind_in_a_child_drops_the_parents_options_for_that_component(tmp_path):
    write(tmp_path / "base.toml", """
        extends = "%s"
        [model.attention]
        kind = "gqa"
        n_kv_head = 1
        backend = "math"
    """ % TINY.as_posix())
    same = write(tmp_path / "same.toml", 'extends = "base.toml"\n[model.attention]\nbackend = "sdpa"\n')
    other = write(tmp_path / "other.toml", 'extends = "base.toml"\n[model.attention]\nkind = "mha"\n')
    shorthand = write(tmp_path / "shorthand.toml", 'extends = "base.toml"\n[model]\nattention = "mqa"\n')
    kept = load_recipe(same).model.attention
    assert (kept.kind, kept.options.n_kv_head, kept.options.backend) == ("gqa", 1, "sdpa")  # same kind: merged
    swapped = load_recipe(other).model.attention
    # the new kind starts from its own defaults: neither gqa's n_kv_head (which mha would refuse) nor backend survive
    assert swapped.kind == "mha" and swapped.options.backend == "sdpa"
    assert load_recipe(shorthand).model.attention.kind == "mqa"


def test_plugins_resolve_relative_to_the_recipe_that_names_them_and_accumulate(tmp_path, monkeypatch):
    monkeypatch.setitem(plugin_manager._consent, "all", True)  # files outside the working directory: consented
    plugin = ROOT / "tests" / "recipes" / "plugins" / "short_position.py"
    relative = Path(os.path.relpath(plugin, tmp_path / "deep")).as_posix()
    write(tmp_path / "deep" / "base.toml", f"""
        extends = "{TINY.as_posix()}"
        plugins = ["{relative}"]
    """)
    write(tmp_path / "deep" / "sub" / "local_plugin.py", "")  # an empty plugin file registers nothing
    child = write(tmp_path / "deep" / "sub" / "child.toml", """
        extends = "../base.toml"
        plugins = ["local_plugin.py"]
        [model.position]
        kind = "short"
        max_len = 64
    """)
    monkeypatch.chdir(ROOT)  # not the recipes' folder: the relative plugin paths must still resolve
    r = load_recipe(child)
    assert r.plugins == [str(plugin), str(tmp_path / "deep" / "sub" / "local_plugin.py")]  # the base's first
    assert r.model.position.kind == "short" and r.model.position.options.max_len == 64


def test_a_relative_plugin_path_is_taken_from_the_recipes_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(plugin_manager._consent, "all", True)  # files outside the working directory: consented
    source = (ROOT / "tests" / "recipes" / "plugins" / "short_position.py").read_text()
    write(tmp_path / "plugins" / "pos.py", source.replace('"short"', '"short_rel"'))
    recipe = write(tmp_path / "recipes" / "r.toml", f"""
        extends = "{TINY.as_posix()}"
        plugins = ["../plugins/pos.py"]
        [model.position]
        kind = "short_rel"
        max_len = 32
    """)
    monkeypatch.chdir(ROOT)
    assert load_recipe(recipe).model.position.kind == "short_rel"
    # and the resolved recipe names it absolutely, so a run folder's copy loads from anywhere
    assert f'plugins = [\n    "{(tmp_path / "plugins" / "pos.py").as_posix()}",\n]' in dump_recipe(load_recipe(recipe))


def test_plugin_option_flag_loads_a_plugin_for_the_recipe(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe("recipes/smoke.toml", ["model.position.kind=short", "model.position.max_len=32"],
                    plugins=["tests/recipes/plugins/short_position.py"])
    assert r.model.position.kind == "short"
    assert r.plugins == [str(ROOT / "tests" / "recipes" / "plugins" / "short_position.py")]


# -- --set ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("train.lr=3e-4", (["train", "lr"], 3e-4)),
    ("train.max_steps=10", (["train", "max_steps"], 10)),
    ("train.compile=true", (["train", "compile"], True)),
    ("train.betas=[0.9, 0.98]", (["train", "betas"], [0.9, 0.98])),
    ('model.attention.kind="gqa"', (["model", "attention", "kind"], "gqa")),
    ("model.attention.kind=gqa", (["model", "attention", "kind"], "gqa")),  # a bare word is a string
    ("generate.prompts=['ROMEO:']", (["generate", "prompts"], ["ROMEO:"])),
    ("data.prepared_dir=data/x y", (["data", "prepared_dir"], "data/x y")),
    (" train.seed = 7 ", (["train", "seed"], 7)),
])
def test_set_values_are_toml_or_a_plain_string(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3", "train.=3"])
def test_a_set_without_a_key_path_and_value_is_refused(text):
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        parse_override(text)


def test_set_overrides_a_recipe_and_says_where_a_bad_value_came_from():
    r = load_recipe(TINY, ["train.lr=3e-4", "model.attention.kind=gqa", "model.attention.n_kv_head=1"])
    assert r.train.lr == 3e-4 and r.model.attention.kind == "gqa" and r.model.attention.options.n_kv_head == 1
    lines = errors_of(TINY, ["train.lr=-1", "model.n_haed=4"])
    assert f"{TINY}: $.train.lr: must be > 0, got -1.0 (from --set train.lr=-1)" in lines
    assert f"{TINY}: $.model.n_haed: unknown key; did you mean 'n_head'? (from --set model.n_haed=4)" in lines


def test_set_kind_drops_the_recipes_options_whatever_the_order_of_the_sets(tmp_path):
    base = write(tmp_path / "gqa.toml", f'extends = "{TINY.as_posix()}"\n[model.attention]\nkind = "gqa"\nn_kv_head = 1\n')
    r = load_recipe(base, ["model.attention.kind=mha"])
    assert r.model.attention.kind == "mha"
    for sets in (["model.attention.kind=sliding_window", "model.attention.window=8"],
                 ["model.attention.window=8", "model.attention.kind=sliding_window"]):
        opts = load_recipe(base, sets).model.attention.options
        assert (opts.window, opts.n_kv_head) == (8, None)


def test_a_later_set_wins_and_a_set_cannot_go_below_a_value():
    assert load_recipe(TINY, ["train.seed=1", "train.seed=2"]).train.seed == 2
    lines = errors_of(TINY, ["train=3", "train.seed=2"])
    assert lines == ["--set train.seed=2: train was set to a value by an earlier --set"]


# -- validation details ---------------------------------------------------------------------------
def test_cross_field_checks_still_run_when_another_field_of_the_section_is_bad(tmp_path):
    # the model section fails (n_head), yet its block_size still feeds the batch arithmetic check
    lines = errors_of(TINY, ["model.n_head=x", "train.tokens_per_step=100"])
    assert len(lines) == 2
    assert lines[1].startswith(f"{TINY}: $.train.tokens_per_step: 100 is not divisible by micro_batch * block_size")


def test_tokens_per_step_and_grad_accum_may_both_be_given_when_they_agree():
    t = load_recipe(TINY, ["train.tokens_per_step=1024", "train.grad_accum=8"]).train
    assert (t.tokens_per_step, t.grad_accum) == (1024, 8)


def test_a_run_folder_without_a_recipe_is_refused(tmp_path):
    assert errors_of(tmp_path) == [f"{tmp_path}: a folder without a recipe.toml (not a run folder)"]


def test_structure_reports_model_config_errors_without_a_file():
    with pytest.raises(ConfigError) as info:
        structure(get_registry(), {"n_head": "twelve", "dropout": -0.5}, ModelConfig)
    assert info.value.lines == ['$.n_head: expected int, got "twelve"', "$.dropout: must be >= 0, got -0.5"]
    assert structure(get_registry(), {"n_layer": 3}, ModelConfig) == ModelConfig(n_layer=3)


def test_resolve_data_is_the_merged_table_before_structuring(tmp_path):
    child = write(tmp_path / "child.toml", f'extends = "{TINY.as_posix()}"\n[model]\nattention = "mqa"\n')
    data = resolve_data(child, ["train.seed=5"])
    assert data["model"]["attention"] == {"kind": "mqa"}  # the string shorthand, as a table
    assert data["train"] == {"micro_batch": 4, "max_steps": 20, "warmup_steps": 2, "eval_interval": 10,
                             "eval_batches": 2, "log_interval": 5, "seed": 5}
    assert data["name"] == "child" and "extends" not in data


@pytest.mark.parametrize("text", ["", "# only a comment\n", 'name = "x"\n'])
def test_an_empty_recipe_is_refused_instead_of_training_the_default_model(tmp_path, text):
    with pytest.raises(ConfigError, match=r"empty.toml: \$: an empty recipe, no \[model\] table: nothing to train"):
        load_recipe(write(tmp_path / "empty.toml", text))


def test_a_recipe_of_empty_tables_is_the_defaults_named_after_its_file(tmp_path):
    r, default = load_recipe(write(tmp_path / "empty.toml", "[train]\n")), Recipe()
    assert r.name == "empty"
    sections = (default.data, default.train, default.deepspeed, default.generate)
    assert (r.data, r.train, r.deepspeed, r.generate) == tuple(resolve_specs(get_registry(), s) for s in sections)
    m = r.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    # the default components come with their options spelled out (what `recipe show` writes)
    registry = get_registry()
    specs = [m.attention, m.norm, m.position, m.mlp]
    assert [s.kind for s in specs] == ["mha", "layernorm", "learned", "gelu"]
    assert all(type(s.options) is registry.get(s.family, s.kind).options for s in specs)


def test_the_annotated_example_in_the_docs_is_a_valid_recipe(tmp_path):
    text = (ROOT / "docs" / "recipes.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    r = load_recipe(write(tmp_path / "example.toml", example))
    assert (r.name, r.model.attention.kind, r.model.attention.options.n_kv_head) == ("my-run", "gqa", 4)
    assert r.train.tokens_per_step == 524288 and r.train.grad_accum is None


def test_plugins_given_by_set_are_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    r = load_recipe(ROOT / "recipes" / "smoke.toml",
                    ['plugins=["recipes/plugins/short_position.py"]', "model.position.kind=short", "model.position.max_len=32"])
    assert r.plugins == [str(ROOT / "tests" / "recipes" / "plugins" / "short_position.py")]


def test_a_schema_class_lacking_a_field_the_families_table_places_there_fails_when_defined():
    """Component fields are written out in the schema (an IDE finds them) and FAMILIES stays the list:
    a family the table places in [train] that TrainConfig does not declare is an error at import."""
    with pytest.raises(TypeError, match="Train lacks the field of optimizer, schedule"):
        @components("train")
        class Train:
            lr: float = 1.0
