"""The hooks a playattention plugin can implement.

A plugin is any module (a built-in under ``plugins/``, a file named by a recipe, or a package
found through the ``playattention`` entry-point group) with functions marked ``@hookimpl``.
"""
import pluggy

hookspec = pluggy.HookspecMarker("playattention")
hookimpl = pluggy.HookimplMarker("playattention")


@hookspec
def register_components(register):
    """Register components: ``register(family, name, factory, options=None, doc=None)``."""
