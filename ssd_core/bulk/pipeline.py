"""Bulk detection over an image bucket (local folder or ``s3://bucket/prefix``) with Ray Data -> Parquet:
the driver side.

Pipeline (streaming, so decoding and inference overlap)::

    list or read a manifest, anti-join with the ledger (Ray tasks, ``pending``)  ->  read + decode + resize/normalise (CPU tasks; in the actors when they run on CPUs)
        ->  batched inference (actor pool, model loaded once per actor; GPU actors also decode JPEGs)
        ->  write block (CPU tasks; in the actors when they run on CPUs)

The actor layout comes from the cluster's nodes (``plan_actors``), never from the driver's own hardware:
a GPU-less head or laptop submitting to a GPU cluster gets GPU actors on the GPU nodes.

The outputs, the ledger and why it is exactly-once: ``ssd_core.bulk.ledger``. What becomes an ``error``
row (the run never stops for a bad input): what ``ssd_core.images.decode_image`` rejects, and objects
deleted or unreadable between listing and reading.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ssd_core import storage
from ssd_core.bulk import ledger
from ssd_core.bulk.pending import Pending, find_pending
from ssd_core.bulk.stages import (
    DEFAULT_SEED,
    DetectConfig,
    Detector,
    PreprocessSpec,
    read_and_preprocess,
    write_block,
)
from ssd_core.cluster import NodeResources, cluster_nodes, init_ray
from ssd_core.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

__all__ = ["detect_bucket", "default_run_id", "resolve_weights", "ActorPlan", "plan_actors", "cpu_block_rows"]

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def default_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-xxxxxx``: sortable and unique enough for one writer."""
    return f"{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}"


def _validate_run_id(run_id: str) -> str:
    if not _RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r}: use letters, digits, '_', '.', '-' (up to 128, no leading symbol)")
    return run_id


def _worker_storage_options(storage_options, *uris: str) -> dict[str, Any]:
    """The caller's options plus the S3 endpoint resolved here, so Ray workers started before the
    environment was set still reach the same endpoint (the endpoint is not a secret; keys stay in the
    credential chain)."""
    options = dict(storage_options or {})
    endpoint = storage.s3_endpoint_from_env()
    if endpoint and any(storage.is_s3(uri) for uri in uris) and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint
    return options


def detect_bucket(
    input_uri: str | None,
    output_uri: str,
    *,
    input_manifest: str | None = None,
    arch: str | None = None,
    weights: str | None = None,
    batch_size: int = 16,
    score_threshold: float = 0.3,
    run_id: str | None = None,
    num_actors: int | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    precision: str = "auto",
    rows_per_file: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Detect objects in every image under ``input_uri`` not yet processed with these weights, writing
    Parquet under ``output_uri`` (see ``ssd_core.bulk.ledger``); with ``input_manifest``, the images that
    manifest names instead (``ssd_core.bulk.manifest``; ``input_uri``, if given, is the root of its
    relative keys). Returns the summary: run_id, images_seen
    (objects listed), images_new (not yet in the ledger), images_skipped, ok, error, not_images,
    detections, seconds, images_per_s, model, weights_digest, actors (the plan: gpu, num_gpus_per_actor,
    min, max) and detected_on (images per Ray node id that ran their inference).

    ``weights``: one of our checkpoints (``arch`` may be omitted) or a foreign state_dict for ``arch``;
    None means random initialisation (seeded; for demos and tests only). The actors are planned from the
    cluster's nodes (see ``plan_actors``); ``num_actors`` fixes the pool size, ``min_actors`` /
    ``max_actors`` let it autoscale, ``num_gpus_per_actor`` (fractional allowed) asks for GPU actors
    even before the cluster has GPU nodes (an autoscaler adds them), 0 for CPU actors.
    """
    if weights is None and arch is None:
        raise ValueError("detect: give --arch (and usually --weights)")
    if input_uri is None and input_manifest is None:
        raise ValueError("detect: give --input or --input-manifest")
    if batch_size < 1 or rows_per_file < 1:
        raise ValueError(f"batch_size ({batch_size}) and rows_per_file ({rows_per_file}) must be >= 1")
    weights = resolve_weights(weights, storage_options)
    if precision == "int8":  # found by the driver, before any actor starts
        from ssd_core.zoo import read_model_metadata

        found = read_model_metadata(weights, arch).precision if weights is not None else "fp32 (random init)"
        if found != "int8":
            raise ValueError(f"precision 'int8' needs an int8 checkpoint; {weights or arch} is {found}: calibrate "
                             "it with `ssd quantize --weights W --data DIR --output W_int8.pt`")
    if weights is None:
        log.warning(
            "NO WEIGHTS GIVEN: %s is randomly initialised (seed %d); detections are meaningless. "
            "Pass --weights for real results.", arch, seed,
        )
    run_id = _validate_run_id(run_id or default_run_id())
    started = time.perf_counter()

    digest = ledger.weights_digest(weights, arch, seed, storage_options)
    worker_options = _worker_storage_options(storage_options, input_uri or "", input_manifest or "", output_uri)
    ledger.remove_uncommitted(output_uri, storage_options)
    init_ray()
    # Listing (or the manifest) and the anti-join with the ledger run in Ray tasks: the driver holds counts
    # and object references, never a row per object (ssd_core.bulk.pending).
    pending = find_pending(input_uri, output_uri, digest, manifest_uri=input_manifest,
                           storage_options=worker_options)
    source = input_manifest or input_uri
    log.info("%d objects listed in %s, %d to process", pending.num_seen, source, pending.num_rows)

    summary: dict[str, Any] = {
        "run_id": run_id, "model": arch, "weights_digest": digest, "images_seen": pending.num_seen,
        "images_new": pending.num_rows, "images_skipped": pending.num_seen - pending.num_rows,
        "ok": 0, "error": 0, "detections": 0, "detected_on": {},
    }
    if pending.num_rows or arch is None:
        from ssd_core.zoo import read_model_metadata

        # Only when needed: the architecture's metadata costs the driver an import of torch.
        metadata = read_model_metadata(weights, arch)  # the driver never builds the network
        summary["model"] = metadata.arch
    if pending.num_rows:
        init_ray()
        plan = plan_actors(
            cluster_nodes(), pending.num_rows, batch_size=batch_size, rows_per_file=rows_per_file,
            num_gpus_per_actor=num_gpus_per_actor, num_actors=num_actors, min_actors=min_actors,
            max_actors=max_actors,
        )
        log.info("actors: %s", plan)
        summary["actors"] = {"gpu": plan.use_gpu, "num_gpus_per_actor": plan.num_gpus_per_actor,
                             "min": plan.min_actors, "max": plan.max_actors}
        config = DetectConfig(
            output_uri=output_uri, run_id=run_id, arch=arch or metadata.arch, weights=weights,
            model_name=metadata.arch, weights_digest=digest, class_names=list(metadata.class_names),
            batch_size=batch_size, rows_per_file=rows_per_file, score_threshold=score_threshold,
            precision=precision, seed=seed, max_pixels=max_pixels, threads_per_actor=plan.threads_per_actor,
            storage_options=worker_options,
            preprocess_spec=PreprocessSpec.of(metadata), decode_in_actor=plan.use_gpu,
        )
        _run_pipeline(pending, config, plan, summary=summary, progress=progress)
    # Extension-less objects whose content was not an image (checked anew each run: they have no row).
    summary["not_images"] = summary["images_new"] - summary["ok"] - summary["error"]
    seconds = time.perf_counter() - started
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round((summary["ok"] + summary["error"]) / seconds, 3) if seconds > 0 else 0.0
    return summary


def resolve_weights(weights: str | None, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The weights file a run uses (a local path or URI), checked to exist; None for random init."""
    if weights is not None and not storage.exists(weights, storage_options):
        raise FileNotFoundError(f"weights file not found: {weights}")
    return weights


@dataclass(frozen=True)
class ActorPlan:
    """How the inference actors are laid out on the cluster."""

    use_gpu: bool
    num_gpus_per_actor: float  # 0 for CPU actors
    min_actors: int
    max_actors: int
    threads_per_actor: int  # torch threads in each actor
    block_rows: int  # listing rows per input block


def plan_actors(nodes: Sequence[NodeResources], num_pending: int, *, batch_size: int, rows_per_file: int,
                num_gpus_per_actor: float | None = None, num_actors: int | None = None,
                min_actors: int | None = None, max_actors: int | None = None) -> ActorPlan:
    """The actor layout from the cluster's nodes (what each node offers, not the driver's hardware).

    GPU actors when any node has a GPU or ``num_gpus_per_actor`` > 0 asks for them: as many as fit on
    the nodes (``num_gpus_per_actor`` each, 1 by default, fractional allowed), while CPU tasks anywhere
    in the cluster read, decode and write. Otherwise one single-threaded CPU actor per CPU of the
    cluster, each reading, decoding, detecting and writing its own blocks. ``num_actors`` fixes the pool;
    ``min_actors`` / ``max_actors`` bound an autoscaling pool (given only a maximum, it starts at one),
    so a cluster that grows gets more actors. Never more actors than there are blocks.
    """
    use_gpu = num_gpus_per_actor > 0 if num_gpus_per_actor is not None else any(n.gpus > 0 for n in nodes)
    gpus_per_actor = float(num_gpus_per_actor or 1.0) if use_gpu else 0.0
    if use_gpu:
        fits = sum(int(n.gpus / gpus_per_actor + 1e-9) for n in nodes)  # an actor does not span nodes
    else:
        fits = sum(int(n.cpus) for n in nodes)  # one single-threaded actor per CPU
    if num_actors is not None:
        min_actors = max_actors = num_actors
    elif max_actors is None:
        max_actors = max(1, fits, min_actors or 1)
        min_actors = min_actors or max_actors
    else:
        min_actors = min_actors or 1
    if not 1 <= min_actors <= max_actors:
        raise ValueError(f"actors: need 1 <= min ({min_actors}) <= max ({max_actors})")
    block_rows = batch_size if use_gpu else cpu_block_rows(num_pending, batch_size, rows_per_file, max_actors)
    # An actor with no block to work on would only cost its start-up; the others get its threads.
    max_actors = min(max_actors, -(-num_pending // block_rows))
    min_actors = min(min_actors, max_actors)
    threads = 1
    if not use_gpu:
        total_cpus = sum(n.cpus for n in nodes)
        largest = max((int(n.cpus) for n in nodes), default=1)
        threads = max(1, min(largest, int(total_cpus) // max_actors))
    return ActorPlan(use_gpu, gpus_per_actor, min_actors, max_actors, threads, block_rows)


def cpu_block_rows(num_pending: int, batch_size: int, rows_per_file: int, num_actors: int) -> int:
    """Images per block on CPU-only nodes, where a block is read, detected and written by one actor as
    one file pair: ``rows_per_file``, but small enough that each actor gets at least four blocks (so no
    actor sits idle at the end while another finishes a big one), rounded up to whole batches."""
    batches_per_actor_share = -(-num_pending // (4 * max(1, num_actors) * batch_size))
    return max(1, min(rows_per_file, batches_per_actor_share * batch_size))


def _run_pipeline(pending: Pending, config: DetectConfig, plan: ActorPlan, *, summary: dict, progress: bool) -> None:
    """Ray Data: read/decode -> inference actors -> write tasks, consumed as summaries. Reading and
    decoding run in CPU tasks before GPU actors, and inside the actors when they run on CPUs."""
    import ray
    from tqdm.auto import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts images, not blocks
    context.enable_operator_progress_bars = False
    # The pending rows come from the anti-join tasks' outputs in the object store, cut into blocks.
    dataset = pending.dataset(plan.block_rows)
    actors = ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors)
    if plan.use_gpu:
        # GPU actors infer (and decode plain JPEGs with nvjpeg) while CPU tasks anywhere in the cluster
        # read, decode the rest and write. num_cpus differs from the actors' on purpose: equal remote
        # args would let Ray fuse decoding into the inference actor.
        dataset = dataset.map_batches(
            read_and_preprocess, batch_size=None, batch_format="pyarrow", fn_kwargs={"config": config},
            num_cpus=0.5,
        ).map_batches(
            Detector, batch_size=config.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"config": config}, compute=actors,
            num_cpus=0, num_gpus=plan.num_gpus_per_actor,
        )
        # Writing is light (a few Parquet files per 1024 images) and must not wait for the GPU actors.
        dataset = dataset.map_batches(write_block, batch_size=config.rows_per_file, batch_format="pyarrow",
                                      fn_kwargs={"config": config}, num_cpus=0.5)
    else:
        # CPU actors: one single-threaded actor per CPU reads, decodes and infers; decoding and inference
        # overlap across actors. Measured on a 2-core machine (ssdlite320, 640x480 JPEGs), steady state:
        # 70-78 img/s this way against 47-55 with read tasks feeding one 2-thread actor: the 20 MB float
        # batches no longer go through the object store, and two one-thread models used two cores better
        # than one two-thread model (2 x 64 against 96 img/s). The actors write their blocks' files too:
        # a separate write stage needs worker processes of its own, and each boots (Python, Ray, Ray
        # Data: 2.7 s of CPU there) while the cores are busy, once when the first file is due and again
        # for the last one, after the detectors have finished.
        dataset = dataset.map_batches(
            Detector, batch_size=None, batch_format="pyarrow",
            fn_constructor_kwargs={"config": config, "owns_blocks": True}, compute=actors, num_cpus=1,
        )
    nodes = summary["detected_on"]
    with tqdm(total=pending.num_rows, unit="img", desc="detect", disable=not progress) as bar:
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            counts = {name: int(sum(block[name].to_pylist())) for name in ("images", "ok", "error", "detections")}
            for name in ("ok", "error", "detections"):
                summary[name] += counts[name]
            for entry in block["nodes"].to_pylist():
                for node, images in json.loads(entry).items():
                    nodes[node] = nodes.get(node, 0) + images
            bar.update(counts["images"])
            bar.set_postfix(ok=summary["ok"], error=summary["error"], boxes=summary["detections"])
