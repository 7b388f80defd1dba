"""Experiment trackers fed by the training loop's metrics log: TensorBoard event files in
RUN_DIR/tensorboard, and an MLflow run when MLFLOW_TRACKING_URI is set.

Both receive the records of metrics.jsonl as they are written (`kind` train / eval / throughput, each with
its `step`), on the main rank only. Each package is imported only when its tracker is used.
Scalars are named `<kind>/<field>` (`train/loss`, `eval/AP`, ...), the same in both.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from ssd_core.storage import atomic_write_bytes, exists, is_s3, join_uri

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow.json"  # RUN_DIR/mlflow.json: the MLflow run a resumed run continues
ARTIFACTS = ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "config.json")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """`<kind>/<field>` -> value for the numeric fields of a metrics.jsonl record (step, epoch left out)."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in ("kind", "step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool)}


class TensorBoardTracker:
    """RUN_DIR/tensorboard event files (torch.utils.tensorboard). A resumed run purges the events the
    interrupted run wrote after its checkpoint, as metrics.jsonl drops those records. An s3:// RUN_DIR gets
    the files copied when the run ends."""

    def __init__(self, output: str, *, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package
        self.target = join_uri(output, TENSORBOARD_DIR)
        self.local = tempfile.mkdtemp(prefix="ssd-tensorboard-") if is_s3(output) else self.target
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=self.local, purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record.get("step", 0)))
        if record.get("kind") == "eval":
            self.writer.flush()  # readable while the run goes on

    def close(self, result: dict[str, Any]) -> None:
        self.writer.close()
        if self.local != self.target:
            for directory, _, files in os.walk(self.local):
                for name in files:
                    path = os.path.join(directory, name)
                    with open(path, "rb") as handle:
                        atomic_write_bytes(join_uri(self.target, os.path.relpath(path, self.local)), handle.read())


class MlflowTracker:
    """One MLflow run per training run (MLFLOW_TRACKING_URI; experiment MLFLOW_EXPERIMENT_NAME or "ssd"):
    the configuration as params, every record's scalars as metrics at its step, and at the end the
    checkpoints, metrics.jsonl, curves.png, config.json and the final metrics (final_metrics.json) as
    artifacts. A resumed run continues the same MLflow run (its id is kept in RUN_DIR/mlflow.json)."""

    def __init__(self, output: str, config: dict[str, Any], *, tracking_uri: str, resume_step: int | None) -> None:
        from mlflow.tracking import MlflowClient  # ImportError without the mlflow(-skinny) package
        self.output = output
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run_file = join_uri(output, MLFLOW_RUN_FILE)
        self.run_id = None
        if resume_step is not None and exists(run_file):
            from ssd_core.storage import open_uri

            with open_uri(run_file) as handle:
                self.run_id = json.load(handle)["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or "ssd"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=os.path.basename(output.rstrip("/")) or None,
                                         tags={"run_dir": output})
            self.run_id = run.info.run_id
            self.log_params(config)
            atomic_write_bytes(run_file, json.dumps({"run_id": self.run_id, "tracking_uri": tracking_uri}).encode())
        log.info("MLflow run %s at %s", self.run_id, tracking_uri)

    def log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
                  for key, value in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(name, value, now, step) for name, value in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, result: dict[str, Any]) -> None:
        final = {k: v for k, v in result.items() if isinstance(v, int | float | str | type(None)) or k == "per_class_AP"}
        self.client.log_dict(self.run_id, final, "final_metrics.json")
        with tempfile.TemporaryDirectory(prefix="ssd-mlflow-") as scratch:
            for name in ARTIFACTS:
                uri = join_uri(self.output, name)
                if not exists(uri):
                    continue
                path = uri
                if is_s3(uri):  # MLflow uploads local files
                    from ssd_core.storage import open_uri

                    path = os.path.join(scratch, name)
                    with open_uri(uri) as source, open(path, "wb") as target:
                        target.write(source.read())
                self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id, status="FINISHED")


def trackers_for(output: str, config: dict[str, Any], *, resume_step: int | None) -> list[Any]:
    """The trackers a run asked for: TensorBoard unless config["tensorboard"] is False, MLflow when
    MLFLOW_TRACKING_URI is set."""
    trackers: list[Any] = []
    if config.get("tensorboard", True):
        try:
            trackers.append(TensorBoardTracker(output, resume_step=resume_step))
        except ImportError:
            log.warning("no TensorBoard event files: the tensorboard package is not installed "
                        "(pip install tensorboard; --no-tensorboard silences this)")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if tracking_uri:
        try:
            trackers.append(MlflowTracker(output, config, tracking_uri=tracking_uri, resume_step=resume_step))
        except ImportError:
            raise ValueError("MLFLOW_TRACKING_URI is set but the mlflow package is not installed: "
                             "pip install mlflow-skinny (or unset MLFLOW_TRACKING_URI)") from None
    return trackers
