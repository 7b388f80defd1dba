"""`ssd bench ledger`: driver memory and wall time of an incremental `ssd detect` that finds nothing new.

For each size N a synthetic S3 Inventory Parquet manifest names N objects and a committed ledger (files
of ``--rows-per-file`` rows, as detect writes them) already holds every one of them, so the run reads the
manifest and the ledger, anti-joins them and stops: no image is read, none needs to exist. Each size runs
in a fresh process with its own local Ray cluster, so the driver's peak resident memory (VmHWM) is that
run's alone; Ray's worker processes are separate and reported separately (the largest peak among them,
sampled at the end of the run). Wall time counts the whole call, Ray's start-up included, as a scheduled
run pays it. Goals: driver peak RSS < 1 GiB at 1M objects, and the 1M re-run < 60 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RSS_GOAL_MIB = 1024
SECONDS_GOAL = 60.0
ARCH = "ssdlite320_mobilenet_v3_large"
BUCKET = "bench-bucket"


def write_fixture(folder: Path, num_objects: int, rows_per_file: int) -> tuple[Path, Path]:
    """A Parquet inventory manifest of ``num_objects`` keys and a ledger committing all of them for the
    random-init weights of ``ARCH`` -> (manifest path, output folder)."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ssd_core.bulk.ledger import images_schema, parquet_bytes, weights_digest

    folder.mkdir(parents=True, exist_ok=True)
    keys = np.char.add(np.char.add("images/", np.char.zfill(np.arange(num_objects).astype(str), 9)), ".jpg")
    sizes = 10_000 + np.arange(num_objects, dtype=np.int64) % 5000
    etags = np.char.zfill(np.arange(num_objects).astype(str), 32)
    manifest = folder / "inventory.parquet"
    pq.write_table(pa.table({"bucket": [BUCKET] * num_objects, "key": keys, "size": sizes, "e_tag": etags,
                             "is_latest": [True] * num_objects}), manifest, compression="zstd")
    output = folder / "out"
    partition = output / "images" / "run_id=bench"
    partition.mkdir(parents=True, exist_ok=True)
    digest = weights_digest(None, ARCH)
    stamp = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for index, start in enumerate(range(0, num_objects, rows_per_file)):
        n = min(rows_per_file, num_objects - start)
        uris = np.char.add(f"s3://{BUCKET}/", keys[start:start + n])
        table = pa.table({
            "image_uri": uris, "size_bytes": sizes[start:start + n], "etag": etags[start:start + n],
            "width": pa.array([640] * n, pa.int32()), "height": pa.array([480] * n, pa.int32()),
            "num_detections": pa.array([0] * n, pa.int32()), "status": ["ok"] * n,
            "error": pa.array([None] * n, pa.string()), "model": [ARCH] * n, "weights_digest": [digest] * n,
            "block_id": [f"{index:08d}"] * n, "processed_at": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
        }, schema=images_schema())
        (partition / f"block-{index:08d}.parquet").write_bytes(parquet_bytes(table))
    return manifest, output


def _vm_hwm_mib(pid: int | str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _worker_peak_mib() -> float:
    """The largest VmHWM among this process's Ray worker processes (``ray::`` in their command line)."""
    peak = 0.0
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if not cmdline.read().startswith(b"ray::"):
                    continue
        except OSError:
            continue
        peak = max(peak, _vm_hwm_mib(pid) or 0.0)
    return peak


def _child(manifest: str, output: str) -> dict[str, Any]:
    """One measured run (in its own process): the incremental detect over the manifest."""
    from ssd_core.bulk import detect_bucket

    started = time.perf_counter()
    summary = detect_bucket(None, output, input_manifest=manifest, arch=ARCH, progress=False)
    seconds = time.perf_counter() - started
    result = {"seconds": round(seconds, 2), "driver_peak_rss_mib": round(_vm_hwm_mib("self"), 1),
              "worker_peak_rss_mib": round(_worker_peak_mib(), 1), "images_seen": summary["images_seen"],
              "images_new": summary["images_new"]}
    import ray

    ray.shutdown()
    return result


def bench_ledger(objects: list[int], rows_per_file: int, work_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per bucket size in ``objects``: wall time and peak RSS of the nothing-new re-run."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="ssd-bench-ledger-") as scratch:
            return bench_ledger(objects, rows_per_file, Path(scratch))
    rows = []
    for count in objects:
        prepared = time.perf_counter()
        manifest, output = write_fixture(work_dir / f"n{count}", count, rows_per_file)
        print(f"# {count} objects: fixture written in {time.perf_counter() - prepared:.1f} s", flush=True)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # a fresh local cluster per size
        for _ in range(3):  # a loaded machine can time out starting a fresh Ray node: try again
            process = subprocess.run(
                [sys.executable, "-m", "ssd_core.bench.ledger", str(manifest), str(output)],
                env=env, capture_output=True, text=True, check=False,
            )
            if "timed out during startup" not in process.stderr:
                break
            time.sleep(10)
        lines = [line for line in process.stdout.splitlines() if line.startswith('{"seconds"')]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"bench ledger at {count} objects failed:\n{process.stderr[-3000:]}")
        result = {"objects": count, "ledger_files": -(-count // rows_per_file), **json.loads(lines[-1])}
        if (result["images_seen"], result["images_new"]) != (count, 0):
            raise RuntimeError(f"expected {count} objects seen and none new, got {result}")
        rows.append(result)
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """The table `ssd bench ledger` prints for `bench_ledger`'s rows."""
    lines = ["# nothing-new incremental run from an S3 Inventory Parquet manifest, fresh process and local Ray "
             "cluster per size",
             f"{'objects':>10} {'ledger files':>13} {'wall s':>8} {'driver peak RSS MiB':>20} {'worker peak RSS MiB':>20}"]
    for row in rows:
        lines.append(f"{row['objects']:>10} {row['ledger_files']:>13} {row['seconds']:>8.1f} "
                     f"{row['driver_peak_rss_mib']:>20.0f} {row['worker_peak_rss_mib']:>20.0f}")
    largest = rows[-1]
    lines.append(f"at {largest['objects']} objects: driver peak {largest['driver_peak_rss_mib']:.0f} MiB "
                 f"(goal < {RSS_GOAL_MIB}), {largest['seconds']:.1f} s (goal < {SECONDS_GOAL:.0f})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
