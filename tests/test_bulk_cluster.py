"""Bulk detection on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a head
without GPUs, where the driver runs, and worker nodes that declare one GPU each (Ray places GPU actors
there; torch falls back to the CPU inside them). Checked with DuckDB reading the table paths directly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from test_bulk import calibrated_checkpoint

from ssd_core.bulk import detect_bucket

pytestmark = pytest.mark.slow

SCORE = 0.3


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """ssdlite320 with spread-out scores, so images get boxes (see test_bulk)."""
    return calibrated_checkpoint(tmp_path_factory.mktemp("weights") / "calibrated.pt")


def write_jpegs(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))  # 96x128
        Image.fromarray(pixels).save(folder / f"img{index:03d}.jpg", quality=90)
    return sorted(str(p) for p in folder.glob("*.jpg"))


@pytest.fixture
def gpu_cluster(tmp_path):
    """Head: 2 CPUs, no GPU (the driver connects here). Two workers: 1 CPU and 1 GPU each."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # an earlier test's local cluster: this driver must join the multi-node one below
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def assert_exactly_once(output: Path, uris: list[str]) -> None:
    """Plain readers of the table paths: one ok images row per object, every box once, nothing else."""
    images = duckdb.sql(f"SELECT * FROM read_parquet('{output}/images/**/*.parquet', hive_partitioning=true)").df()
    assert sorted(images["image_uri"]) == uris
    assert set(images["status"]) == {"ok"}
    detections = duckdb.sql(
        f"SELECT * FROM read_parquet('{output}/detections/**/*.parquet', hive_partitioning=true)").df()
    assert len(detections) == images["num_detections"].sum() > 0
    per_image = detections.groupby("image_uri").size().to_dict()
    assert all(per_image.get(uri, 0) == n for uri, n in zip(images["image_uri"], images["num_detections"]))
    distinct = detections.drop_duplicates(["image_uri", "label", "score", "x1", "y1", "x2", "y2"])
    assert len(distinct) == len(detections)  # no duplicated boxes


def test_gpu_actors_run_on_the_gpu_workers_though_the_driver_has_none(gpu_cluster, small_checkpoint, tmp_path):
    import ray

    cluster, workers = gpu_cluster
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id  # the driver is on the head
    uris = write_jpegs(tmp_path / "in", 24)
    summary = detect_bucket(str(tmp_path / "in"), str(tmp_path / "out"), weights=str(small_checkpoint),
                            batch_size=4, rows_per_file=8, score_threshold=SCORE, precision="fp32", progress=False)
    assert summary["actors"] == {"gpu": True, "num_gpus_per_actor": 1.0, "min": 2, "max": 2}
    assert summary["ok"] == 24
    ran_on = summary["detected_on"]
    assert sum(ran_on.values()) == 24
    assert set(ran_on) <= {worker.node_id for worker in workers}  # never the GPU-less head
    assert_exactly_once(tmp_path / "out", uris)


def test_a_worker_node_lost_mid_run_does_not_fail_the_run(gpu_cluster, small_checkpoint, tmp_path):
    cluster, workers = gpu_cluster
    uris = write_jpegs(tmp_path / "in", 64)
    output = tmp_path / "out"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = detect_bucket(
                str(tmp_path / "in"), str(output), weights=str(small_checkpoint), batch_size=2, rows_per_file=2,
                score_threshold=SCORE, precision="fp32", progress=False, run_id="node-lost",
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while len(list(output.glob("images/*/*.parquet"))) < 2:
        assert thread.is_alive(), f"the run ended before a node could be lost: {result}"
        assert time.monotonic() < deadline, "no blocks committed in time"
        time.sleep(0.1)
    committed = len(list(output.glob("images/*/*.parquet")))
    cluster.remove_node(workers[0], allow_graceful=False)  # its raylet and everything on it are killed
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the node was lost"
    assert "error" not in result, repr(result.get("error"))
    assert committed * 2 < len(uris), "the run had nearly finished when the node was lost; nothing was tested"
    summary = result["summary"]
    assert summary["ok"] + summary["error"] == summary["images_new"] == len(uris)
    assert_exactly_once(output, uris)
