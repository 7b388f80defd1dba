"""Every infra file parses, none holds a credential, the env-var scanner works, and prefect.yaml imports."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from infra_helpers import (
    INFRA,
    REPO,
    code_config_env_names,
    env_names_read_by_source,
    infra_files,
    load_yaml_documents,
    lock_versions,
)

# AWS key id; a 40-char secret after a secret-ish name; PEM private keys; generic key=value literals.
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"(?i)(secret|password|token)[\w\-]*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token)\s*[:=]\s*['\"]?(?!\$\{)[A-Za-z0-9/+]{8,}"),
]


def secret_findings(text: str) -> list[str]:
    return [match.group(0) for pattern in SECRET_PATTERNS for match in pattern.finditer(text)]


def test_every_yaml_and_json_file_parses():
    yaml_files = infra_files(".yaml", ".yml")
    json_files = infra_files(".json")
    assert len(yaml_files) >= 7 and json_files
    for path in yaml_files:
        assert load_yaml_documents(path), path
    for path in json_files:
        assert json.loads(path.read_text()), path


def test_no_credential_literals_in_any_infra_file():
    files = [p for p in INFRA.rglob("*") if p.is_file() and ".data" not in p.parts]
    assert len(files) >= 12
    for path in files:
        assert secret_findings(path.read_text(errors="replace")) == [], path


@pytest.mark.parametrize(
    "planted",
    [
        "AWS_ACCESS_KEY_ID: AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "-----BEGIN RSA PRIVATE KEY-----",
        "AWS_SECRET_ACCESS_KEY: hunter2hunter2",
    ],
)
def test_secret_scan_catches_planted_credentials(planted):
    assert secret_findings(planted)


def test_secret_scan_accepts_references():
    assert secret_findings("AWS_SECRET_ACCESS_KEY: ${MINIO_ROOT_PASSWORD:-minioadmin}") == []


def test_env_scanner_finds_direct_reads_and_looped_names():
    source = '''
import os
from os import environ, getenv
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
def f():
    a = os.environ.get("RAY_ADDRESS")
    b = os.getenv("PREFECT_API_URL", "")
    c = environ["SSD_CACHE"]
    d = getenv("HOME")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return [os.environ.get(n) for n in ENDPOINT_VARS]
'''
    assert env_names_read_by_source(source) == {
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "RAY_ADDRESS",
        "PREFECT_API_URL",
        "SSD_CACHE",
        "HOME",
        "RAY_USAGE_STATS_ENABLED",
    }
    # Prefixed strings in modules that never touch the environment are not reads.
    assert env_names_read_by_source('LABEL = "AWS_REGION"\n') == set()


def test_scanner_sees_the_storage_module_endpoint_variables():
    assert (REPO / "ssd_core" / "storage.py").exists(), "ssd_core/storage.py is where the S3 endpoint is read"
    assert {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} <= code_config_env_names()


def _prefect_deployments() -> list[dict]:
    path = REPO / "prefect.yaml"
    if not path.exists():
        return []
    return yaml.safe_load(path.read_text()).get("deployments") or []


def test_prefect_yaml_deployments_use_the_pools_infra_provides():
    deployments = _prefect_deployments()
    assert deployments, "prefect.yaml declares no deployments"
    for deployment in deployments:
        assert deployment["work_pool"]["name"] in ("ssd-process", "ssd-k8s"), deployment["name"]


@pytest.mark.parametrize(
    "entrypoint",
    sorted({d["entrypoint"] for d in _prefect_deployments()}),
)
def test_prefect_yaml_entrypoints_import(entrypoint):
    from prefect import Flow

    file_part, _, function_name = entrypoint.rpartition(":")
    path = REPO / file_part
    assert path.is_file(), entrypoint
    module_name = "_infra_entrypoint_" + re.sub(r"\W", "_", file_part)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered first, as Prefect's own loader does: dataclasses resolve string annotations through
    # sys.modules[cls.__module__] (flows/download.py has `from __future__ import annotations`).
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    flow = getattr(module, function_name)
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    assert inspect.signature(flow.fn)


def test_lock_has_what_ray_clusters_need():
    versions = lock_versions()
    # ray[default] brings the dashboard/job server (aiohttp_cors, opencensus, prometheus_client) and grpcio.
    assert {"grpcio", "aiohttp-cors", "prometheus-client", "opencensus"} <= set(versions)


def test_readme_marks_steps_and_carries_the_capacity_anchors():
    text = (INFRA / "README.md").read_text()
    steps = re.findall(r"^### \d+\..*$", text, re.M)
    assert len(steps) >= 6
    assert all("[runs here]" in step or "[needs a cluster" in step for step in steps)
    for figure in ("724 img/s", "1057 img/s"):
        assert figure in text
    # The CPU bulk figure is the one measured in docs/benchmarks.md, not a copy that drifts.
    benchmarks = (REPO / "docs" / "benchmarks.md").read_text()
    measured = re.search(r"^\| `ssd detect` end to end[^|]*\| ([\d.]+) \|$", benchmarks, re.M)
    assert measured, "docs/benchmarks.md has no `ssd detect` end-to-end row"
    assert f"{round(float(measured.group(1)))} img/s end to end" in text
    assert "cannot be built here" in text
    assert Path(INFRA / "Dockerfile").exists()
