"""pytest plugin (entry point pytest11): the ``slow`` marker and a ``playattention_registry`` fixture.

It loads in every pytest run in an environment where playattention is installed, so it imports
nothing heavy at module level.
"""
from __future__ import annotations

import pytest


def pytest_configure(config):
    # plugin packages using ComponentConformance get its marker without declaring it
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still runs in CI)")


@pytest.fixture
def playattention_registry():
    """A registry of its own for one test: built-ins plus installed plugin packages, not the process-wide one."""
    from toolkit.plugin_manager import PluginManager

    return PluginManager().registry
