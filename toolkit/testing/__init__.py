"""Conformance kit for playattention components; see :mod:`toolkit.testing.conformance`.

    from toolkit.testing import conformance, ComponentConformance

Imports are lazy: the pytest plugin in this package loads in every pytest run and must stay cheap.
"""
from __future__ import annotations

import importlib

__all__ = ["ComponentConformance", "ConformanceError", "check_component", "conformance"]


def __getattr__(name: str):
    if name == "conformance":
        return importlib.import_module(".conformance", __name__)
    if name in ("check_component", "ConformanceError"):
        return getattr(importlib.import_module(".conformance", __name__), name)
    if name == "ComponentConformance":
        return importlib.import_module(".suite", __name__).ComponentConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
