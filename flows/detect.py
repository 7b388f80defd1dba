"""`detect-bucket`: incremental bulk detection over a folder or s3:// prefix (``ssd_core.bulk``).

Safe on a schedule and when runs overlap. ``ssd_core.bulk`` is exactly-once by itself (the images/
ledger), but it wants one writer per output at a time, so the detection holds a slot of a Prefect
global concurrency limit named after the output (``detect-bucket-<hash of output>``, limit 1, created
on first use): a second run over the same output waits for the first and then processes only what is
still new (usually nothing). Runs over different outputs do not wait for each other. The limit lives
in the Prefect API's database, so it holds across processes and machines talking to one server, and
in ephemeral mode (flow functions called directly, no server) across processes sharing PREFECT_HOME.
Compaction (``compact=True`` here, or the ``compact-output`` flow) rewrites the output's files and holds
the same limit, so it never runs beside a detection of that output.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from flows.artifacts import publish_table, scalar_rows

SUMMARY_ORDER = ("run_id", "images_seen", "images_new", "images_skipped", "ok", "error", "detections",
                 "seconds", "images_per_s", "model", "weights_digest")


def output_lock_name(output: str) -> str:
    """The global concurrency limit that serialises writers of ``output`` (a valid Prefect name)."""
    canonical = output if "://" in output else os.path.abspath(output)
    return "detect-bucket-" + hashlib.sha256(canonical.rstrip("/").encode()).hexdigest()[:16]


def ensure_lock(name: str) -> None:
    """Create the global concurrency limit ``name`` with one slot unless it exists (race-safe)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it in between


def is_transient(task, task_run, state) -> bool:
    """Retry storage and network errors (S3 listing, reads, writes): the ledger makes a rerun skip
    what was committed. A missing input, a missing weights file or a bad argument fails at once."""
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=is_transient)
def run_detection(input: str, output: str, arch: str | None, weights: str | None, batch_size: int,
                  score_threshold: float, precision: str, num_actors: int | None, min_actors: int | None = None,
                  max_actors: int | None = None, num_gpus_per_actor: float | None = None,
                  input_manifest: str | None = None) -> dict[str, Any]:
    from ssd_core.bulk import detect_bucket

    return detect_bucket(input, output, input_manifest=input_manifest, arch=arch, weights=weights, batch_size=batch_size,
                         score_threshold=score_threshold, precision=precision, num_actors=num_actors,
                         min_actors=min_actors, max_actors=max_actors, num_gpus_per_actor=num_gpus_per_actor,
                         progress=False)


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=is_transient)
def run_compaction(output: str) -> dict[str, int]:
    from ssd_core.bulk.compact import compact_output

    return compact_output(output)


@flow(name="detect-bucket", log_prints=True)
def detect_bucket_flow(input: str | None, output: str, arch: str | None = None, weights: str | None = None,
                       batch_size: int = 16, score_threshold: float = 0.3, precision: str = "auto",
                       num_actors: int | None = None, min_actors: int | None = None, max_actors: int | None = None,
                       num_gpus_per_actor: float | None = None, input_manifest: str | None = None,
                       compact: bool = False, wait_seconds: float | None = 6 * 3600) -> dict[str, Any]:
    """Detect objects in every image under ``input`` (folder or s3://bucket/prefix) not yet processed
    with these weights, appending Parquet under ``output`` (``detections/``, ``images/``).

    ``input_manifest``: a file naming the images instead of listing ``input`` (an S3 Inventory
    manifest.json, CSV, Parquet or a plain list; ``input`` may then be None or the root of relative keys).
    ``weights``: one of our checkpoints (``arch`` may then be omitted). ``num_actors`` (fixed) or
    ``min_actors`` / ``max_actors`` (autoscaling) and ``num_gpus_per_actor`` as for ``ssd detect``. ``wait_seconds``: how long to
    wait for another run on the same output to finish before failing (None: forever). ``compact``: merge
    the output's small files afterwards (``ssd_core.bulk.compact``), still holding the output's lock.
    """
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    lock = output_lock_name(output)
    ensure_lock(lock)
    # strict: if the limit cannot be used, fail rather than write concurrently.
    with concurrency(lock, occupy=1, timeout_seconds=wait_seconds, strict=True):
        summary = run_detection(input, output, arch, weights, batch_size, score_threshold, precision, num_actors,
                                min_actors, max_actors, num_gpus_per_actor, input_manifest)
        if compact:
            summary["compaction"] = run_compaction(output)
    publish_table("detect-bucket-summary", scalar_rows(summary, SUMMARY_ORDER),
                  f"bulk detection of {input_manifest or input} into {output}")
    logger.info("run %s: %d images seen, %d new, %d ok, %d error, %d detections",
                summary["run_id"], summary["images_seen"], summary["images_new"], summary["ok"],
                summary["error"], summary["detections"])
    return summary


@flow(name="compact-output", log_prints=True)
def compact_output_flow(output: str, wait_seconds: float | None = 6 * 3600) -> dict[str, int]:
    """Merge the small Parquet files of ``output``'s committed detect runs into large ones
    (``ssd_core.bulk.compact``), holding the same per-output lock as ``detect-bucket``, so compaction never
    runs while a detection writes to that output."""
    from prefect.concurrency.sync import concurrency

    lock = output_lock_name(output)
    ensure_lock(lock)
    with concurrency(lock, occupy=1, timeout_seconds=wait_seconds, strict=True):
        summary = run_compaction(output)
    publish_table("compact-output-summary", scalar_rows(summary, ("files_before", "files_after", "groups")),
                  f"compaction of {output}")
    return summary
