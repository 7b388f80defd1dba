"""A run folder's files: claiming the folder (a fresh run never overwrites another), metrics.jsonl
(mirrored to the experiment trackers), curves.png and JSON files, local or on s3://."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ssd_core.storage import atomic_write_bytes, exists, is_s3, join_uri

log = logging.getLogger(__name__)

# Files a run writes into RUN_DIR ("ray": Ray Train's default checkpoint storage); a folder with one of
# RUN_MARKERS already holds a run.
RUN_MARKERS = ("last.pt", "metrics.jsonl")
RUN_FILES = (*RUN_MARKERS, "best.pt", "config.json", "curves.png", "tensorboard", "mlflow.json", "ray")


def claim_run_folder(output: str, *, resume: bool, overwrite: bool, also: Sequence[str] = ()) -> None:
    """Make `output` ready for a run. A folder that already holds one (last.pt or metrics.jsonl, or any
    of the `also` locations, e.g. Ray's checkpoints of the run) is refused unless `resume` (continue it)
    or `overwrite` (delete that run's files, then start afresh); other files in the folder are kept."""
    if resume:
        return
    found = [name for name in RUN_MARKERS if exists(join_uri(output, name))] + [uri for uri in also if exists(uri)]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"{output} already holds a run ({', '.join(found)}); pass --resume to continue it "
                         "or --overwrite to replace it")
    from ssd_core.storage import remove

    for uri in [join_uri(output, name) for name in RUN_FILES] + list(also):
        if remove(uri):
            log.info("--overwrite: deleted %s", uri)


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line. Local files are appended to; on s3:// the whole
    (small) file is rewritten, as objects cannot be appended to. On resume, records beyond the resumed
    step (written after the checkpoint by the interrupted run) are dropped. Every record also goes to the
    experiment trackers (`ssd_core.tracking`: TensorBoard, MLflow) chosen by `config`; `close(result)`
    ends them."""

    def __init__(self, output: str, *, resume_step: int | None, config: dict[str, Any] | None = None) -> None:
        self.path = join_uri(output, "metrics.jsonl")
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and exists(self.path):
            from ssd_core.visualize import read_metrics_jsonl

            self.records = [r for r in read_metrics_jsonl(self.path) if int(r.get("step", 0)) <= resume_step]
        self._rewrite()
        self.trackers: list[Any] = []
        if config is not None:
            from ssd_core.tracking import trackers_for

            self.trackers = trackers_for(output, config, resume_step=resume_step)

    def close(self, result: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.close(result)

    def _rewrite(self) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        for tracker in self.trackers:
            tracker.log(record)
        if is_s3(self.path):
            self._rewrite()
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def write_curves(output: str) -> None:
    """RUN_DIR/curves.png from metrics.jsonl (rendered locally, then copied for s3://)."""
    import tempfile

    from ssd_core.visualize import plot_training_curves

    metrics_path = join_uri(output, "metrics.jsonl")
    if not is_s3(output):
        plot_training_curves(metrics_path, join_uri(output, "curves.png"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training_curves(metrics_path, os.path.join(tmp, "curves.png"))
        atomic_write_bytes(join_uri(output, "curves.png"), png.read_bytes())


def write_json(uri: str, value: Any) -> None:
    atomic_write_bytes(uri, (json.dumps(value, indent=2) + "\n").encode())
