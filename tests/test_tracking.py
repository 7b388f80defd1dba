"""Experiment tracking: TensorBoard event files and an MLflow run (local file store), read back with
tensorboard's EventAccumulator and MlflowClient, against the run's own metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssd_core.data import write_synthetic_dataset
from ssd_core.engine import fit
from ssd_core.train_config import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("tracking") / "data", 8, 4, seed=1, progress=False)


def config(data: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        arch="ssdlite320_mobilenet_v3_large", data=str(data), output=str(output), epochs=2, batch_size=4,
        lr=0.05, warmup_iters=1, precision="fp32", workers=0, seed=0, augment="none", model={"size": [96, 96]},
        eval_max_images=4, eval_batch_size=4, log_every=1, loader_probe_batches=0, progress=False, threads=1,
        weights_backbone=None,
    )
    values.update(changes)
    return TrainConfig(**values)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_metrics_reach_tensorboard_and_mlflow(data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking_uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    run_dir = tmp_path / "run"
    result = fit(config(data, run_dir))
    train, evals = records(run_dir, "train"), records(run_dir, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]

    # TensorBoard: every scalar of metrics.jsonl at its step (event files store float32).
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/skipped_images", "eval/AP", "eval/AP50", "eval/ARl"} <= set(
        events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    ap50 = events.Scalars("eval/AP50")
    assert [e.step for e in ap50] == [r["step"] for r in evals]
    assert [e.value for e in ap50] == pytest.approx([r["AP50"] for r in evals], rel=1e-6)

    # MLflow: params, metrics per step and epoch, artifacts, finished.
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["arch"] == "ssdlite320_mobilenet_v3_large" and run.data.params["epochs"] == "2"
    assert json.loads(run.data.params["model"]) == {"size": [96, 96]}
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert history == [(r["step"], r["loss"]) for r in train]
    ap = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/AP"))
    assert ap == [(r["step"], r["AP"]) for r in evals]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"last.pt", "metrics.jsonl", "curves.png", "config.json", "final_metrics.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "last.pt", str(tmp_path / "download")))
    assert local.read_bytes() == (run_dir / "last.pt").read_bytes()
    final = json.loads(Path(client.download_artifacts(run.info.run_id, "final_metrics.json",
                                                      str(tmp_path / "download"))).read_text())
    assert final["AP"] == result["AP"] and final["step"] == 4

    # Resumed, the run continues the same MLflow run and TensorBoard drops the events past the checkpoint.
    fit(config(data, run_dir, epochs=3, resume=True))
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/AP")) == [2, 4, 6]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_off_and_mlflow_unset_write_nothing(data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    fit(config(data, run_dir, epochs=1, tensorboard=False))
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "mlflow.json").exists()
