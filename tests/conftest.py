"""Shared test setup: CPU DeepSpeed, few threads, a fresh plugin manager where a test asks for one."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test models are tiny: one thread beats two (no sync overhead), and 2-rank tests get a core each.
torch.set_num_threads(1)


@pytest.fixture
def fresh_plugins():
    """A process-wide plugin manager rebuilt for this test and forgotten after it."""
    from toolkit import plugin_manager

    plugin_manager.reset()
    yield plugin_manager.get_plugin_manager()
    plugin_manager.reset()
