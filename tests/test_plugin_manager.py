"""Plugin loading: built-ins, entry points, files and modules; broken plugins are reported, never fatal."""
import sys
import textwrap

import pytest

from toolkit import plugin_manager
from toolkit.plugin_manager import PluginFailure, PluginLoadError, PluginManager
from toolkit.registry import Source

GOOD = """
    import attrs
    from torch import nn
    from toolkit.hookspecs import hookimpl

    @attrs.frozen
    class ShiftOptions:
        amount: float = 1.0

    class Shift(nn.Module):
        '''Adds a constant.'''
        Options = ShiftOptions
        def __init__(self, opts, dims, dim):
            super().__init__()
            self.amount = opts.amount
        def forward(self, x):
            return x + self.amount

    @hookimpl
    def register_components(register):
        register("norm", "{name}", Shift)
"""
RAISES_ON_IMPORT = """
    raise ImportError("needs a package that is not installed\\nsecond line")
"""
HOOK_RAISES_AFTER_ONE = """
    from torch import nn
    from toolkit.hookspecs import hookimpl

    @hookimpl
    def register_components(register):
        register("norm", "{name}", nn.Identity)
        raise RuntimeError("half-way through")
"""
DUPLICATES_A_BUILTIN = """
    from torch import nn
    from toolkit.hookspecs import hookimpl

    @hookimpl
    def register_components(register):
        register("mlp", "{name}", nn.Identity)
        register("attention", "mha", nn.Identity)
"""
WRONG_HOOK_SIGNATURE = """
    from toolkit.hookspecs import hookimpl

    @hookimpl
    def register_components(registry):
        pass
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Write plugin modules (and optionally a dist-info with entry points) on a temporary sys.path entry."""
    written: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str, **fmt) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source.format(**fmt) if fmt else source))
        written.append(module)
        return module

    def dist(name: str, version: str, entry_points: dict[str, str]) -> None:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[playattention]\n{eps}")

    write.dist = dist
    write.path = tmp_path
    yield write
    for module in written:
        sys.modules.pop(module, None)


def failure_for(pm: PluginManager, plugin: str) -> PluginFailure:
    found = [f for f in pm.failures if f.plugin == plugin]
    assert found, f"no failure recorded for {plugin!r}: {pm.failures}"
    return found[0]


def test_builtins_register_with_the_package_as_source():
    pm = PluginManager(entry_points=False)
    builtins = {("attention", "mha"), ("norm", "layernorm"), ("position", "learned"), ("mlp", "gelu"), ("mlp", "relu")}
    assert builtins <= {(c.family, c.name) for c in pm.registry}
    src = pm.registry.get("attention", "mha").source
    assert (src.plugin, src.package) == ("toolkit.plugins.attention", "playattention") and src.version
    assert pm.failures == []


def test_entry_point_plugins_are_discovered_with_package_and_version(plugin_dir):
    plugin_dir("pa_ep_good", GOOD, name="shift_ep")
    plugin_dir.dist("pa-demo", "1.2.3", {"demo": "pa_ep_good"})
    pm = PluginManager()
    comp = pm.registry.get("norm", "shift_ep")
    assert comp.source == Source("demo", "pa-demo", "1.2.3")
    assert comp.doc == "Adds a constant." and comp.options.__name__ == "ShiftOptions"


def test_broken_entry_points_are_reported_by_name_package_version_and_reason(plugin_dir):
    plugin_dir("pa_ep_ok", GOOD, name="shift_ok")
    plugin_dir("pa_ep_import", RAISES_ON_IMPORT)
    plugin_dir("pa_ep_hook", HOOK_RAISES_AFTER_ONE, name="half_registered")
    plugin_dir.dist("pa-broken", "0.9", {"imports": "pa_ep_import", "hook": "pa_ep_hook", "ok": "pa_ep_ok",
                                         "missing": "pa_ep_no_such_module"})
    pm = PluginManager()
    assert failure_for(pm, "imports") == PluginFailure(
        "imports", "pa-broken", "0.9", "ImportError: needs a package that is not installed")
    assert failure_for(pm, "hook").reason == "RuntimeError: half-way through"
    assert failure_for(pm, "missing").reason.startswith("ModuleNotFoundError: No module named 'pa_ep_no_such_module'")
    assert str(failure_for(pm, "hook")) == "plugin 'hook' from pa-broken 0.9 failed: RuntimeError: half-way through"
    # the others still load, and the half-way plugin left nothing behind
    assert ("norm", "shift_ok") in pm.registry and ("attention", "mha") in pm.registry
    assert ("norm", "half_registered") not in pm.registry


def test_a_plugin_is_registered_atomically_when_it_clashes_with_another(plugin_dir):
    plugin_dir("pa_dup", DUPLICATES_A_BUILTIN.replace('"attention", "mha"', '"mlp", "{name}"'), name="first_ok")
    pm = PluginManager(entry_points=False)
    pm.add_module("pa_dup")
    reason = failure_for(pm, "pa_dup").reason
    assert reason.startswith("RegistryError: mlp 'first_ok' registered twice in namespace 'pa_dup': by pa_dup and by "
                             "pa_dup; rename one of them")
    assert ("mlp", "first_ok") not in pm.registry  # registered before the clash, rolled back


def test_a_plugin_registering_a_builtin_name_loads_beside_it_and_says_how_to_choose_it(plugin_dir, capsys):
    plugin_dir("pa_dup", DUPLICATES_A_BUILTIN, name="first_ok")
    pm = PluginManager(entry_points=False)
    pm.add_module("pa_dup")
    assert not pm.failures and ("mlp", "first_ok") in pm.registry
    assert pm.registry.get("attention", "mha").source.plugin == "toolkit.plugins.attention"  # bare: the built-in
    assert pm.registry.get("attention", "pa_dup:mha").source.plugin == "pa_dup"
    assert capsys.readouterr().err == ("[playattention] note: pa_dup registers attention 'mha' as a built-in does; "
                                       "a recipe chooses it as 'pa_dup:mha' (a bare 'mha' means the built-in)\n")


def test_a_hook_with_the_wrong_signature_is_reported(plugin_dir):
    plugin_dir("pa_badsig", WRONG_HOOK_SIGNATURE)
    pm = PluginManager(entry_points=False)
    pm.add_module("pa_badsig")
    assert failure_for(pm, "pa_badsig").reason.endswith(
        "Argument(s) {'registry'} are declared in the hookimpl but can not be found in the hookspec")


def test_plugin_files_load_and_strict_failures_raise(plugin_dir, monkeypatch):
    monkeypatch.chdir(plugin_dir.path)  # plugin files of the current project run without asking
    good = plugin_dir("pa_file_good", GOOD, name="shift_file")
    bad = plugin_dir("pa_file_bad", RAISES_ON_IMPORT)
    pm = PluginManager(entry_points=False)
    pm.add(str(plugin_dir.path / f"{good}.py"))
    assert pm.registry.get("norm", "shift_file").source.plugin == str(plugin_dir.path / f"{good}.py")
    with pytest.raises(PluginLoadError, match=r"pa_file_bad\.py' failed: ImportError: needs a package"):
        pm.add(str(plugin_dir.path / f"{bad}.py"))
    with pytest.raises(PluginLoadError, match="nowhere.py' failed: no such file"):
        pm.add(str(plugin_dir.path / "nowhere.py"))
    pm.add_file(plugin_dir.path / "nowhere.py", strict=False)
    assert failure_for(pm, str(plugin_dir.path / "nowhere.py")).reason == "no such file"
    before = list(pm.failures)
    pm.add(str(plugin_dir.path / f"{good}.py"))  # loading the same file again is a no-op, not a clash
    assert pm.failures == before


def test_modules_named_by_import_path_load_and_unknown_ones_fail_strictly(plugin_dir):
    plugin_dir("pa_mod_good", GOOD, name="shift_mod")
    pm = PluginManager(entry_points=False)
    pm.add("pa_mod_good")
    assert pm.registry.get("norm", "shift_mod").source == Source("pa_mod_good")
    with pytest.raises(PluginLoadError, match="'pa_no_such_mod' failed: ModuleNotFoundError"):
        pm.add("pa_no_such_mod")


@pytest.mark.parametrize("via", ["env", "argument"])
def test_trace_shows_who_registered_what(plugin_dir, monkeypatch, capsys, via):
    plugin_dir("pa_trace", GOOD, name="shift_trace")
    plugin_dir("pa_trace_bad", HOOK_RAISES_AFTER_ONE, name="never_there")
    if via == "env":
        monkeypatch.setenv("PLAYATTENTION_TRACE", "1")
        pm = PluginManager(entry_points=False)
    else:
        monkeypatch.delenv("PLAYATTENTION_TRACE", raising=False)
        pm = PluginManager(entry_points=False, trace=True)
    pm.add_module("pa_trace")
    pm.add_module("pa_trace_bad")
    err = capsys.readouterr().err
    assert "[playattention] playattention" in err and "(toolkit.plugins.attention) registered attention 'mha'" in err
    assert "[playattention] pa_trace registered norm 'shift_trace'" in err
    assert "[playattention] plugin 'pa_trace_bad' failed: RuntimeError: half-way through" in err
    assert "never_there" not in err  # rolled back, so never announced


def test_no_trace_output_by_default(monkeypatch, capsys):
    monkeypatch.delenv("PLAYATTENTION_TRACE", raising=False)
    PluginManager(entry_points=False)
    assert capsys.readouterr().err == ""


def test_each_set_of_plugins_gets_its_own_registry_and_the_defaults_stay_untouched(plugin_dir):
    plugin_dir("pa_own", GOOD, name="shift_own")
    plain = plugin_manager.load_registry()
    mine = plugin_manager.load_registry(["pa_own"])
    assert ("norm", "shift_own") in mine and ("norm", "shift_own") not in plain
    assert plain is plugin_manager.default_registry() and plugin_manager.load_registry(["pa_own"]) is mine
    assert ("norm", "shift_own") not in plugin_manager.load_registry()  # nothing leaked into the defaults


def test_a_plugin_file_is_imported_once_however_many_registries_use_it(plugin_dir, monkeypatch):
    monkeypatch.chdir(plugin_dir.path)  # plugin files of the current project run without asking
    name = plugin_dir("pa_once", GOOD, name="shift_once")
    path = str(plugin_dir.path / f"{name}.py")
    a = PluginManager(entry_points=False)
    a.add(path)
    b = PluginManager(entry_points=False)
    b.add(path)
    # the same class object in both: options made for one registry are valid in the other
    assert a.registry.get("norm", "shift_once").factory is b.registry.get("norm", "shift_once").factory


SCHEDULE_AND_COMMAND = """
    from toolkit.hookspecs import hookimpl

    class Halving:
        '''Halves the learning rate every 10 steps.'''
        def __init__(self, opts, train):
            self.lr = train.lr
        def __call__(self, step):
            return self.lr * 0.5 ** (step // 10)

    def hello(parser):
        '''Says hello.'''
        parser.add_argument("--who", default="world")
        return lambda args: print(f"hello {{args.who}}") or 0

    @hookimpl
    def register_schedules(register):
        register("{name}", Halving)

    @hookimpl
    def register_commands(register):
        register("hello-{name}", hello)
"""


def test_every_kind_has_its_own_hook_and_register_callback(plugin_dir):
    plugin_dir("pa_kinds", SCHEDULE_AND_COMMAND, name="halving")
    pm = PluginManager(entry_points=False)
    pm.add_module("pa_kinds")
    assert pm.registry.get("schedule", "halving").doc == "Halves the learning rate every 10 steps."
    assert pm.registry.get("command", "hello-halving").doc == "Says hello."
    built_ins = {(c.family, c.name) for c in PluginManager(entry_points=False).registry}
    assert {("schedule", "cosine"), ("schedule", "wsd"), ("tokenizer", "char"), ("tokenizer", "gpt2"),
            ("dataset", "tinyshakespeare")} <= built_ins


def test_a_component_hook_cannot_register_another_kind(plugin_dir):
    plugin_dir("pa_wrongkind", """
        from toolkit.hookspecs import hookimpl

        @hookimpl
        def register_components(register):
            register("schedule", "sneaky", lambda opts, train: None)
    """)
    pm = PluginManager(entry_points=False)
    pm.add_module("pa_wrongkind")
    assert failure_for(pm, "pa_wrongkind").reason == (
        "ValueError: register_components registers attention, norm, position, mlp, block, parametrization, not 'schedule' "
        "(use register_schedules)")
