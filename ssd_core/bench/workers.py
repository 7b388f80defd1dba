"""`ssd bench train --workers`: training images/s on Ray Train per worker count (`fit_distributed`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ssd_core.distributed import fit_distributed
from ssd_core.storage import join_uri
from ssd_core.train_config import TrainConfig


def _steady_images_per_s(metrics_path: str) -> tuple[float | None, int]:
    """Images/s over the train records of metrics.jsonl after the first (warm-up) step, and the
    number of steps it covers. Each record is one step (log_every=1): images/s = total / sum of times."""
    from ssd_core.visualize import read_metrics_jsonl

    records = [r for r in read_metrics_jsonl(metrics_path) if r.get("kind") == "train"][1:]
    if not records:
        return None, 0
    return len(records) / sum(1.0 / r["images_per_s"] for r in records), len(records)


def bench_train_workers(
    arch: str,
    data: str,
    worker_counts: Iterable[int] = (1, 2),
    steps: int = 10,
    batch_size: int = 4,
    *,
    size: Sequence[int] | None = None,
    precision: str = "fp32",
    use_gpu: bool = False,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """Training images/s of `arch` on `data` for each Ray worker count (same per-worker batch).

    Each count is a fresh run of `steps` + 1 steps (over as many epochs as the dataset needs; no
    augmentation, loader in-process, evaluation only of one image at the end); images/s counts all
    workers' images over the optimizer steps alone and leaves the first step (DDP set-up) out. `size` overrides the
    model's input size. Scaling needs one core (or GPU) per worker: on a machine with fewer, the figure
    records the overhead of synchronising gradients rather than a speed-up.
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ssd-bench-train-") as scratch:
        base = output or scratch
        for count in worker_counts:
            run_dir = join_uri(base, f"workers-{count}")
            config = TrainConfig(
                arch=arch, data=data, output=run_dir, epochs=steps + 1, max_steps=steps + 1, eval_every=0,
                weights_backbone=None,  # throughput only: no download
                batch_size=batch_size, precision=precision, workers=0, augment="none", warmup_iters=0,
                log_every=1, loader_probe_batches=0, eval_max_images=1, progress=False, overwrite=True,
                model={"size": list(size)} if size else {},
            )
            started = time.perf_counter()
            result = fit_distributed(config, num_workers=count, use_gpu=use_gpu, max_failures=0,
                                     run_name=f"bench-workers-{count}-{int(time.time())}", keep_checkpoints=1)
            wall = time.perf_counter() - started
            rate, measured_steps = _steady_images_per_s(join_uri(run_dir, "metrics.jsonl"))
            rows.append({
                "arch": arch, "workers": count, "batch_size_per_worker": batch_size,
                "total_batch": batch_size * count, "steps": measured_steps, "precision": result.get("precision"),
                "images_per_s": rate, "images_per_s_per_worker": rate / count if rate else None,
                "wall_s": wall,
            })
    first = rows[0]["images_per_s"] if rows else None
    for row in rows:
        row["speedup"] = row["images_per_s"] / first if first and row["images_per_s"] else None
    return rows
