"""Suite-wide settings: quiet, offline services, a torch thread count restored after each test, and
`gpu`-marked tests skipped where there is no CUDA device."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (and only they) where there is none."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests may lower torch's thread count to stay off a busy machine's cores; put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
