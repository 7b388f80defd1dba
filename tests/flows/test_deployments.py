"""End to end through real Prefect processes: server on 127.0.0.1, `prefect deploy --all` from
prefect.yaml, a process worker on the pool `ssd-process`, and flow runs started with the `prefect` CLI.

The worker runs in a scratch directory, so the runs also prove that the pull step finds the project.
Flow-run states and artifacts are read over the server's REST API (httpx), independently of the flows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (the worker's flow-run children too), SIGKILL what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


class PrefectStack:
    """A Prefect server and a process worker started by the test, with their own PREFECT_HOME."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.root = root
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("SSD_PROJECT_DIR", None)
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], cwd: Path) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-6000:]

    def cli(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def wait_healthy(self, server: subprocess.Popen, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"server exited:\n{self.log('server')}"
            try:
                if httpx.get(f"{self.api}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"server not healthy after {timeout}s:\n{self.log('server')}")

    def run_deployment(self, name: str, **params) -> str:
        argv = ["deployment", "run", name]
        for key, value in params.items():
            argv += ["--param", f"{key}={json.dumps(value)}"]
        output = self.cli(*argv)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        assert match, output
        return match.group(1)

    def flow_run(self, run_id: str) -> dict:
        import httpx

        return httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30).json()

    def wait(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in TERMINAL:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {timeout}s:\n"
                             f"{self.log('worker')}")

    def artifacts(self, run_id: str) -> dict[str, dict]:
        import httpx

        response = httpx.post(f"{self.api}/artifacts/filter", timeout=30,
                              json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {item["key"]: item for item in response.json()}


@pytest.fixture
def stack(tmp_path) -> Iterator[PrefectStack]:
    stack = PrefectStack(tmp_path)
    try:
        yield stack
    finally:
        for process in reversed(stack.processes):
            stop(process)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployments_run_end_to_end(stack, tmp_path):
    import httpx

    from ssd_core.data import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", 8, 4, progress=False)
    run_dir, report_dir, detections = tmp_path / "run", tmp_path / "report", tmp_path / "detections"

    server = stack.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(stack.port)],
                         cwd=tmp_path)
    stack.wait_healthy(server)
    stack.cli("work-pool", "create", "ssd-process", "--type", "process")
    # Prefect's own command, as a user types it (`make deploy`); it stops non-zero at the first failure.
    output = stack.cli("--no-prompt", "deploy", "--all", timeout=300)
    names = {"train-ssd/train-ssd", "evaluate-ssd/evaluate-ssd", "detect-bucket/detect-bucket",
             "download-coco/download-coco", "compact-output/compact-output"}
    text = " ".join(output.replace("│", " ").split())  # Rich panels: borders and wrapping
    for name in names:
        assert f"Deployment '{name}' successfully created" in text, output
    registered = httpx.post(f"{stack.api}/deployments/filter", json={}, timeout=30).json()
    flows = httpx.post(f"{stack.api}/flows/filter", json={}, timeout=30).json()
    flow_names = {flow["id"]: flow["name"] for flow in flows}
    assert {f"{flow_names[d['flow_id']]}/{d['name']}" for d in registered} == names
    assert {d["work_pool_name"] for d in registered} == {"ssd-process"}
    scratch = tmp_path / "worker-cwd"
    scratch.mkdir()
    stack.start("worker", [PREFECT, "worker", "start", "--pool", "ssd-process", "--type", "process"], cwd=scratch)

    train_id = stack.run_deployment(
        "train-ssd/train-ssd", data=str(data), output=str(run_dir), epochs=1, batch_size=2, workers=1,
        size=[128], weights_backbone="none", options={"max_steps_per_epoch": 2, "workers": 0, "eval_max_images": 2,
                             "loader_probe_batches": 0, "progress": False},
    )
    # A run that cannot succeed must end FAILED with its reason, not hang.
    failing_id = stack.run_deployment("evaluate-ssd/evaluate-ssd", weights=str(tmp_path / "missing.pt"),
                                      data=str(data), output=str(tmp_path / "never"))
    train = stack.wait(train_id, timeout=400)
    assert train["state"]["type"] == "COMPLETED", (train["state"], stack.log("worker"))
    assert (run_dir / "last.pt").is_file()
    train_artifacts = stack.artifacts(train_id)
    metrics = {row["name"]: row["value"] for row in json.loads(train_artifacts["train-ssd-metrics"]["data"])}
    assert metrics["step"] == 2 and 0.0 <= metrics["AP"] <= 1.0
    # Prefect stores a link artifact as markdown: [text](link).
    assert f"(file://{run_dir})" in train_artifacts["train-ssd-run"]["data"]

    checkpoint = str(run_dir / "last.pt")
    evaluate_id = stack.run_deployment("evaluate-ssd/evaluate-ssd", weights=checkpoint, data=str(data),
                                       output=str(report_dir), workers=0)
    detect_id = stack.run_deployment("detect-bucket/detect-bucket", input=str(data / "val"),
                                     output=str(detections), weights=checkpoint)

    failing = stack.wait(failing_id, timeout=120)
    assert failing["state"]["type"] == "FAILED"
    assert "missing.pt" in failing["state"]["message"], failing["state"]

    evaluate = stack.wait(evaluate_id, timeout=300)
    assert evaluate["state"]["type"] == "COMPLETED", (evaluate["state"], stack.log("worker"))
    saved = json.loads((report_dir / "metrics.json").read_text())
    assert (report_dir / "report.md").is_file() and 0.0 <= saved["AP"] <= 1.0
    report_artifacts = stack.artifacts(evaluate_id)
    assert "# Evaluation report" in report_artifacts["evaluate-ssd-report"]["data"]
    assert report_artifacts["evaluate-ssd-metrics"]["type"] == "table"

    detect = stack.wait(detect_id, timeout=300)
    assert detect["state"]["type"] == "COMPLETED", (detect["state"], stack.log("worker"))
    summary = {row["name"]: row["value"]
               for row in json.loads(stack.artifacts(detect_id)["detect-bucket-summary"]["data"])}
    assert summary["images_new"] == summary["ok"] == 4

    import duckdb

    ledger = duckdb.sql(f"SELECT image_uri, status FROM read_parquet('{detections}/images/**/*.parquet')").fetchall()
    assert sorted(Path(uri).name for uri, _ in ledger) == sorted(p.name for p in (data / "val").iterdir())
    assert {status for _, status in ledger} == {"ok"}
