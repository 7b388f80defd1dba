"""Fixtures for the infra tests (helpers live in infra_helpers.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from infra_helpers import INFRA, load_yaml_documents


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="session")
def k8s_documents() -> list[dict]:
    return [doc for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in load_yaml_documents(path)]


@pytest.fixture(scope="session")
def work_pool_template() -> dict:
    return json.loads((INFRA / "prefect" / "k8s-work-pool.json").read_text())
