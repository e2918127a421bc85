"""The hooks a playattention plugin can implement: one per kind of extension.

A plugin is any module (a built-in under ``plugins/``, a file named by a recipe, or a package
found through the ``playattention`` entry-point group) with functions marked ``@hookimpl``::

    @hookimpl
    def register_components(register):
        register("attention", "my_attention", MyAttention)

Each hook is declared once, with its one-line docstring, in :data:`toolkit.families.HOOKS`
(beside the families it registers), and becomes a pluggy hookspec here;
``playattention plugins --hooks`` lists them.
"""
import pluggy

from .families import HOOKS

hookspec = pluggy.HookspecMarker("playattention")
hookimpl = pluggy.HookimplMarker("playattention")


def _hookspec(name: str, doc: str):
    def spec(register):
        pass

    spec.__name__ = spec.__qualname__ = name
    spec.__doc__ = doc
    return hookspec(spec)


for _name, _doc in HOOKS.items():
    globals()[_name] = _hookspec(_name, _doc)
