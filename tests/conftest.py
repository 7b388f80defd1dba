"""Suite-wide settings: quiet, offline services and a torch thread count restored after each test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests may lower torch's thread count to stay off a busy machine's cores; put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
