"""Flow wiring that needs no training: the output lock, failures, parameters, prefect.yaml, the pull step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_detect_waits_for_the_output_lock_and_writes_nothing_meanwhile(prefect_harness, tmp_path):
    from prefect.concurrency.sync import concurrency

    from flows.detect import detect_bucket_flow, ensure_lock, output_lock_name

    output = tmp_path / "detections"
    lock = output_lock_name(str(output))
    ensure_lock(lock)
    with concurrency(lock, occupy=1, strict=True):  # another run is writing this output
        state = detect_bucket_flow(input=str(tmp_path), output=str(output), arch="ssdlite320_mobilenet_v3_large",
                                   wait_seconds=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(TimeoutError):
        state.result()
    assert not output.exists()


def test_compaction_holds_the_detect_lock_of_its_output(prefect_harness, tmp_path):
    """compact-output waits for a detection of the same output (the same lock), then compacts."""
    import pyarrow as pa
    from prefect.concurrency.sync import concurrency

    from flows.detect import compact_output_flow, ensure_lock, output_lock_name
    from ssd_core.bulk import ledger
    from ssd_core.query import query

    output = str(tmp_path / "detections")
    for block in range(3):
        uris = [f"s3://b/{block}-{i}.jpg" for i in range(2)]
        images = ledger.images_schema().empty_table().to_pydict()
        images.update(image_uri=uris, size_bytes=[1, 2], etag=["e", "e"], status=["ok", "ok"],
                      weights_digest=["w", "w"], block_id=[str(block)] * 2)
        images = {k: v or [None, None] for k, v in images.items()}
        ledger.commit_block(output, "r", str(block), ledger.detections_schema().empty_table(),
                            pa.table(images, schema=ledger.images_schema()))
    before = sorted(query(output, "SELECT image_uri FROM images")["image_uri"].to_pylist())
    files = sorted(p.name for p in (tmp_path / "detections").rglob("*.parquet"))
    lock = output_lock_name(output)
    ensure_lock(lock)
    with concurrency(lock, occupy=1, strict=True):  # a detection of this output is running
        state = compact_output_flow(output=output, wait_seconds=2, return_state=True)
    assert state.is_failed()
    assert sorted(p.name for p in (tmp_path / "detections").rglob("*.parquet")) == files  # untouched
    summary = compact_output_flow(output=output)
    assert (summary["files_before"], summary["files_after"]) == (6, 2)
    assert sorted(query(output, "SELECT image_uri FROM images")["image_uri"].to_pylist()) == before


def test_output_lock_is_created_once_with_one_slot(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.detect import ensure_lock, output_lock_name

    name = output_lock_name(f"s3://bucket/{tmp_path.name}/")
    assert name == output_lock_name(f"s3://bucket/{tmp_path.name}")  # a trailing slash is the same output
    assert name != output_lock_name(f"s3://bucket/{tmp_path.name}-other")
    ensure_lock(name)
    ensure_lock(name)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active


def test_evaluate_with_missing_weights_fails_with_the_reason(prefect_harness, tmp_path):
    from flows.evaluate import evaluate_ssd

    missing = tmp_path / "nope.pt"
    state = evaluate_ssd(weights=str(missing), data=str(tmp_path), output=str(tmp_path / "report"),
                         return_state=True)
    assert state.is_failed()
    assert str(missing) in state.message
    assert not (tmp_path / "report").exists()


def test_train_config_maps_flow_parameters():
    from flows.train import train_config

    config = train_config(arch="ssdlite320_mobilenet_v3_large", data="d", output="o", epochs=3, batch_size=4,
                          resume=True, size=[256], options={"time_budget_s": 60.0, "workers": 0})
    assert (config.epochs, config.batch_size, config.resume, config.time_budget_s, config.workers) == (3, 4, True,
                                                                                                        60.0, 0)
    assert config.model == {"size": [256, 256]}
    assert (config.weights, config.weights_backbone, config.trainable_backbone_layers) == (None, "DEFAULT", None)
    tuned = train_config(arch="ssd300_vgg16", data="d", output="o", epochs=1, batch_size=1, resume=False,
                         weights="COCO_V1", weights_backbone="none", trainable_backbone_layers=3)
    assert (tuned.weights, tuned.weights_backbone, tuned.trainable_backbone_layers) == ("COCO_V1", "none", 3)
    assert tuned.resolved().weights_backbone is None  # "none": from scratch
    with pytest.raises(ValueError, match="unknown training options: colour"):
        train_config(arch="a", data="d", output="o", epochs=1, batch_size=1, resume=False, options={"colour": 1})


def test_scalar_rows_keep_order_and_drop_nested_values():
    from flows.artifacts import scalar_rows

    rows = scalar_rows({"z": 1, "AP": 0.123456, "per_class_AP": {"a": 1.0}, "APs": None, "b": "x"}, ["AP", "APs"])
    assert rows == [{"name": "AP", "value": 0.1235}, {"name": "APs", "value": None}, {"name": "b", "value": "x"},
                    {"name": "z", "value": 1}]


def test_server_takes_the_null_paging_prefects_client_sends(prefect_harness):
    """Prefect's client sends `"limit": null, "offset": null` for paging left at its default (`prefect deploy`
    reads the pool's online workers that way after each deployment). The locked FastAPI must treat an explicit
    null like a missing value (FastAPI 0.151 started to validate it, and the server answered 422)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    pool = "null-paging-check"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        assert client.read_workers_for_work_pool(pool, worker_filter=online) == []
        assert pool in {p.name for p in client.read_work_pools()}
        client.send_worker_heartbeat(pool, "worker-a")
        assert [w.name for w in client.read_workers_for_work_pool(pool)] == ["worker-a"]


def test_prefect_yaml_declares_the_deployments_on_the_process_pool():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"train-ssd", "evaluate-ssd", "detect-bucket", "compact-output", "download-coco"}
    for name, deployment in deployments.items():
        assert deployment["work_pool"]["name"] == "ssd-process"
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        assert flow.name == name  # `prefect deployment run NAME/NAME`
        unknown = set(deployment.get("parameters", {})) - set(flow.parameters.properties)
        assert not unknown, (name, unknown)
    assert deployments["detect-bucket"]["schedules"][0]["cron"]
    assert spec["pull"] == [{"flows.steps.set_project_directory": {}}]


def test_pull_step_changes_to_the_project_directory(tmp_path, monkeypatch):
    from flows.steps import set_project_directory

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SSD_PROJECT_DIR", raising=False)
    assert set_project_directory() == {"directory": str(REPO)}
    assert Path(os.getcwd()) == REPO

    monkeypatch.setenv("SSD_PROJECT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SSD_PROJECT_DIR"):
        set_project_directory()
