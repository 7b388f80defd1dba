"""Flows run in Prefect's ephemeral mode against a throwaway database (one server for the session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/s3_server.py (the shared moto fixtures) lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from s3_server import moto_s3, s3_bucket  # noqa: E402, F401

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary SQLite-backed Prefect API (subprocess) for flow functions called directly."""
    from prefect.testing.utilities import prefect_test_harness

    # Startup runs the database migrations; on a busy 2-core machine that can take a minute.
    with prefect_test_harness(server_startup_timeout=300):
        yield
