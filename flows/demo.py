"""`python -m flows.demo` (`make demo`): the whole pipeline on one machine, through the Prefect flows.

Synthetic COCO-format dataset -> Ray training (train-ssd) -> COCO report (evaluate-ssd) -> bulk
detection over a folder standing in for a bucket (detect-bucket) -> a DuckDB query over the Parquet.
The flow functions are called directly, so Prefect runs them in ephemeral mode: no server needed,
and the runs and artifacts land in the SQLite database under PREFECT_HOME (`make server` shows them).
The defaults finish within about 15 minutes on a 2-core CPU; each run of the demo trains afresh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

DEFAULT_DIR = ".state/demo"
LEDGER_QUERY = ("SELECT status, count(*) AS images, sum(num_detections) AS boxes FROM images "
                "WHERE run_id = '{run_id}' GROUP BY status")
QUERY = ("SELECT label_name, count(*) AS boxes, round(avg(score), 3) AS mean_score "
         "FROM detections WHERE run_id = '{run_id}' GROUP BY label_name ORDER BY boxes DESC")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"demo folder (default {DEFAULT_DIR})")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=256, help="square model input size (the arch's own is 320)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    parser.add_argument("--workers", type=int, default=1, help="Ray training workers")
    parser.add_argument("--score-threshold", type=float, default=0.1,
                        help="detect-bucket keeps boxes above this score (a few minutes of training gives "
                        "modest scores)")
    return parser.parse_args(argv)


def _environment(demo_dir: Path) -> None:
    """Defaults for running outside make (which exports the same): Prefect state under .state, no
    telemetry, and room for the ephemeral API server's first start (database migrations) on a busy CPU."""
    os.environ.setdefault("PREFECT_HOME", str(demo_dir.resolve().parent / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _fill_bucket(images: Path, bucket: Path) -> int:
    """Copy the validation images into the stand-in bucket (only those missing); returns the count."""
    bucket.mkdir(parents=True, exist_ok=True)
    copied = 0
    for image in sorted(images.iterdir()):
        if not (bucket / image.name).exists():
            shutil.copy2(image, bucket / image.name)
            copied += 1
    return copied


def _print_table(table) -> None:
    rows = table.to_pylist()
    names = table.column_names
    widths = [max(len(name), *(len(str(row[name])) for row in rows)) if rows else len(name) for name in names]
    print("  " + "  ".join(name.ljust(width) for name, width in zip(names, widths)))
    for row in rows:
        print("  " + "  ".join(str(row[name]).ljust(width) for name, width in zip(names, widths)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = Path(args.dir)
    _environment(demo)
    data, run, report = demo / "data", demo / "run", demo / "report"
    bucket, detections = demo / "bucket", demo / "detections"
    timings: dict[str, float] = {}

    from ssd_core.data import write_synthetic_dataset

    started = time.perf_counter()
    if (data / "annotations" / "instances_val.json").exists():
        print(f"[1/5] synthetic dataset: reusing {data}")
    else:
        print(f"[1/5] synthetic dataset: {args.num_train} train / {args.num_val} val images -> {data}")
        write_synthetic_dataset(data, args.num_train, args.num_val, seed=0)
    timings["data"] = time.perf_counter() - started

    from flows.detect import detect_bucket_flow
    from flows.evaluate import evaluate_ssd
    from flows.train import train_ssd

    print(f"[2/5] train-ssd: {args.arch} at {args.size}px, {args.minutes:g} min on {args.workers} Ray worker(s)")
    if run.exists():
        shutil.rmtree(run)  # the demo trains afresh; Ray would otherwise resume the previous run
    started = time.perf_counter()
    result = train_ssd(
        data=str(data), output=str(run), arch=args.arch, epochs=1000, batch_size=args.batch_size,
        workers=args.workers, size=[args.size], cpus_per_worker=max(1, (os.cpu_count() or 1) // args.workers),
        weights_backbone="none",  # the demo trains from scratch, offline
        # Flips, not IoU crops, and a short warm-up: what learns most in a few hundred steps (docs/training.md).
        options={"time_budget_s": args.minutes * 60, "eval_every": 0, "workers": 1, "augment": "flip",
                 "warmup_iters": 100},
    )
    timings["train"] = time.perf_counter() - started
    checkpoint = result["checkpoint"]

    print("[3/5] evaluate-ssd: COCO report on the validation split")
    started = time.perf_counter()
    metrics = evaluate_ssd(weights=checkpoint, data=str(data), output=str(report), workers=0)
    timings["evaluate"] = time.perf_counter() - started

    print(f"[4/5] detect-bucket: {bucket} (a folder standing in for s3://...) -> {detections}")
    started = time.perf_counter()
    _fill_bucket(data / "val", bucket)
    summary = detect_bucket_flow(input=str(bucket), output=str(detections), weights=checkpoint,
                                 score_threshold=args.score_threshold)
    timings["detect"] = time.perf_counter() - started

    from ssd_core.query import query

    print("[5/5] DuckDB over the Parquet")
    for template in (LEDGER_QUERY, QUERY):
        sql = template.format(run_id=summary["run_id"])
        print(f"  {sql}")
        _print_table(query(str(detections), sql))

    import ray

    if ray.is_initialized():
        ray.shutdown()
    print()
    print(f"Done: AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f} after {result['step']} steps; "
          f"{summary['ok']} images detected, {summary['detections']} boxes.")
    print("Time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items()))
    print("Artifacts:")
    for label, path in [
        ("dataset", data), ("checkpoint", checkpoint), ("training metrics", run / "metrics.jsonl"),
        ("training curves", run / "curves.png"), ("COCO report", metrics["report"]),
        ("detections (Parquet)", detections / "detections"), ("ledger (Parquet)", detections / "images"),
        ("Prefect runs and artifacts", Path(os.environ["PREFECT_HOME"]) / "prefect.db"),
    ]:
        print(f"  {label:<28} {path}")
    print("Query again: ssd query --output", detections, '"SELECT * FROM images LIMIT 5"')
    print("Re-evaluate: make eval    Browse the runs: make server, then http://127.0.0.1:4200")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
