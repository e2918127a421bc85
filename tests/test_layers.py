"""The toolkit's layers point one way: contracts and registry at the bottom, the CLI on top, no cycles.

Every import of a toolkit module counts, at module level or inside a function, so a lower module
cannot reach up lazily to dodge a cycle. See ../shared/design.md and toolkit/families.py.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: each module's layer; a module imports only from its own layer or below
LAYERS = {
    1: ["errors", "families", "contracts", "hookspecs", "registry", "plots", "report", "scaling", "scoring", "headstats", "safeio",
        "validators"],
    2: ["plugin_manager", "converter", "tokenizer", "plugins", "recipe"],
    3: ["model", "data", "catalog"],
    4: ["engine", "checkpoint", "hf", "inspection", "probe"],
    5: ["trainer", "checkpointer", "runfolder", "trackers", "evaluate", "lm_harness", "signals", "progress", "generate",
        "ablation", "ablate", "testing", "launch", "losscompare", "convert", "runs", "completion", "lookinside",
        "coordcheck"],
    6: ["cli", "commands", "__main__"],
}
#: built-in plugins that import what a higher layer defines sit in that layer; the plugin manager
#: imports them by name at run time, so nothing below imports them (plugins/architectures.py names
#: the hf adapters without importing them, so it needs no entry)
OWN_LAYER: dict[str, int] = {}
#: may import toolkit modules inside functions: the pytest plugin loads in every pytest run and must stay cheap
LAZY_ALLOWED = {"toolkit.testing.pytest_plugin"}


def modules() -> dict[str, Path]:
    """Every toolkit module by dotted name (the built-ins under their installed name, toolkit.plugins)."""
    found = {}
    for path in sorted((ROOT / "toolkit").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        parts = path.relative_to(ROOT / "plugins").with_suffix("").parts
        found[".".join(("toolkit.plugins", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def layer_of(module: str) -> int | None:
    if module in OWN_LAYER:
        return OWN_LAYER[module]
    top = module.split(".")[1] if module.count(".") >= 1 else None
    return next((n for n, names in LAYERS.items() if top in names), None)


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(toolkit module imported, whether the import sits inside a function) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from . import data` imports the submodule toolkit.data; `from .x import y` imports toolkit.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("toolkit") and name not in ("toolkit", module):
                out.append((name, id(node) in nested))
    return out


GRAPH = {m: imports(m, p, set(modules())) for m, p in modules().items()}


def test_every_toolkit_module_has_a_layer():
    missing = [m for m in GRAPH if m != "toolkit" and layer_of(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "toolkit"))
def test_no_module_imports_one_above_it(module):
    upward = [f"{dep} (layer {layer_of(dep)})" for dep, _ in GRAPH[module] if layer_of(dep) > layer_of(module)]
    assert not upward, f"{module} (layer {layer_of(module)}) imports upward: {', '.join(upward)}"


def test_no_toolkit_module_is_imported_inside_a_function():
    lazy = sorted({f"{m} -> {dep}" for m, deps in GRAPH.items() for dep, inside in deps
                   if inside and m not in LAZY_ALLOWED})
    assert not lazy, f"import these at the top of the module: {lazy}"


def test_there_is_no_import_cycle():
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for dep, _ in GRAPH.get(module, []):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_hf_uses_components_through_the_registry_not_plugin_modules():
    reached = sorted(f"{m} -> {dep}" for m, deps in GRAPH.items() if m.startswith("toolkit.hf")
                     for dep, _ in deps if dep.startswith("toolkit.plugins"))
    assert not reached, f"toolkit/hf imports built-in plugin modules: {reached}"


def test_the_checker_catches_an_upward_import_a_lazy_one_and_a_cycle(tmp_path):
    """The checks above on a deliberately broken pair of modules."""
    registry = tmp_path / "registry.py"
    registry.write_text("def f():\n    from .trainer import Trainer\n")
    trainer = tmp_path / "trainer.py"
    trainer.write_text("from . import registry\n")
    known = {"toolkit.registry", "toolkit.trainer"}
    up = imports("toolkit.registry", registry, known)
    assert up == [("toolkit.trainer", True)] and layer_of("toolkit.trainer") > layer_of("toolkit.registry")
    assert imports("toolkit.trainer", trainer, known) == [("toolkit.registry", False)]


def test_importing_the_recipe_package_loads_no_torch():
    """The schema, composition and validation are plain Python: reading and checking a recipe's own
    fields needs neither torch nor DeepSpeed (building the model is toolkit.probe's, a layer above)."""
    code = "import sys, toolkit.recipe; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"], out.stdout
