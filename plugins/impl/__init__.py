"""The built-in parts' code (torch modules, optimizers, evaluators), imported only when a part is built.

Each module of :mod:`toolkit.plugins` declares its parts (options classes and registrations by
name, ``"toolkit.plugins.impl.norm:RMSNorm"``) without importing torch, so listing the plugins and
reading a recipe stay fast; the module here of the same name holds what those names point to.
"""
