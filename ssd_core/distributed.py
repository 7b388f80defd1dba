"""Distributed training on Ray Train: the engine's `fit` inside a TorchTrainer, unchanged.

One process per Ray worker runs `engine.fit` with a `RayRuntime`: DistributedDataParallel over nccl
(GPUs) or gloo (CPUs), the batches of each epoch dealt out by rank (the engine's `EpochSampler`, which
shards like DistributedSampler), evaluation and run files on rank 0, and every checkpoint reported
through `ray.train.report` into Ray's storage (a local directory or S3) as well as written to
RUN_DIR/last.pt, so `ssd_core.load_model(RUN_DIR/last.pt)` works for a Ray run as for a local one.

Recovery has two levels, both resuming from the latest reported checkpoint:
- a worker that dies is replaced by Ray (`FailureConfig(max_failures)`), and the new worker group
  starts the loop again with `ray.train.get_checkpoint()` returning that checkpoint;
- a run started again with `resume` and the same run name and storage path (Ray Train V2: a new trainer
  with the same `RunConfig(name, storage_path)`) picks up where the stopped one ended. Without `resume`
  (or `overwrite`, which deletes the previous run) a RUN_DIR that already holds a run is refused, as
  for a local run.

With RAY_ADDRESS set, `fit_distributed` joins that cluster; otherwise it starts a local one. On a
cluster of several nodes, RUN_DIR, the dataset and the storage path must be reachable from every node
(s3:// or a shared file system): worker processes do not see the driver's local disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torch import nn

from ssd_core import engine
from ssd_core.checkpoint import serialize
from ssd_core.cluster import init_ray
from ssd_core.runs import claim_run_folder
from ssd_core.storage import atomic_write_bytes, exists, is_s3, join_uri
from ssd_core.train_config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"  # the file inside each reported Ray checkpoint directory
RAY_STORAGE_SUBDIR = "ray"  # default storage path: RUN_DIR/ray


# -- the worker side -------------------------------------------------------------------------------


class RayRuntime(engine.Runtime):
    """The engine's runtime inside one Ray Train worker (rank `rank` of `world_size`).

    The device is the one Ray assigned (`ray.train.torch.get_device()`); the model is wrapped in DDP
    (optionally with SyncBatchNorm, CUDA only) by `ray.train.torch.prepare_model`; checkpoints are
    reported through `ray.train.report` by every rank (it is a barrier), with the checkpoint directory
    from rank 0 only.
    """

    def __init__(self, output: str, *, resume: bool = False, sync_batchnorm: bool = False) -> None:
        import ray.train
        import ray.train.torch

        device = ray.train.torch.get_device()
        super().__init__(output, device=device.type, resume=resume)
        self.device = device  # with its index: cuda:k on a multi-GPU node
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.sync_batchnorm = sync_batchnorm
        self.restored_from: str | None = None  # the Ray checkpoint this worker group resumed from
        self._scratch = tempfile.mkdtemp(prefix=f"ssd-ray-rank{self.rank}-")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """SyncBatchNorm (if asked, world_size > 1), device placement and the DDP wrapper."""
        import ray.train.torch

        if self.sync_batchnorm and self.world_size > 1:
            if self.device.type != "cuda":
                # torch's SyncBatchNorm raises on CPU tensors; fail before the first step does.
                raise ValueError("sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on CPU)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return ray.train.torch.prepare_model(model)

    def claim_output(self, config: TrainConfig) -> None:
        """Nothing: the driver (`fit_distributed`) claimed RUN_DIR before starting the workers, and a
        worker group that Ray restarts after a failure must find the run it is recovering."""

    def restore_checkpoint(self) -> str | None:
        """The latest checkpoint Ray reported for this run (after a worker failure or when the run is
        started again under the same name), downloaded to local disk; else RUN_DIR/last.pt with --resume."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return super().restore_checkpoint()
        # A directory per rank: ranks on one node must not download into the same place.
        local = checkpoint.to_directory(os.path.join(self._scratch, "restored"))
        self.restored_from = checkpoint.path
        if self.is_main:
            log.info("resuming from Ray checkpoint %s", checkpoint.path)
        return os.path.join(local, CHECKPOINT_FILE)

    def save_checkpoint(self, payload: dict[str, Any], tag: str, *, best: bool = False) -> None:
        """Rank 0: RUN_DIR/last.pt (and best.pt), then the same bytes reported as a Ray checkpoint named
        after `tag`. Other ranks report the metrics only (the call is a barrier for all of them)."""
        import ray.train

        state = payload.get("state", {})
        metrics = {"step": state.get("step"), "epoch": state.get("epoch"), "tag": tag, **payload.get("metrics", {})}
        if not self.is_main:
            ray.train.report(metrics, checkpoint=None)
            return
        data = serialize(payload)
        atomic_write_bytes(join_uri(self.output, CHECKPOINT_FILE), data)
        if best:
            atomic_write_bytes(join_uri(self.output, "best.pt"), data)
        with tempfile.TemporaryDirectory(dir=self._scratch) as directory:
            with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as handle:
                handle.write(data)
            # The timestamp keeps names unique if a restarted run reaches the same tag again.
            name = f"{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
            # SYNC upload (the default): the directory is copied to storage before report returns.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=name)

    def report(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics to Ray (rank 0's become `Result.metrics`); every rank calls it."""
        import ray.train

        ray.train.report(metrics)

    def sum_over_ranks(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


def train_loop_per_worker(config_dict: dict[str, Any]) -> dict[str, Any]:
    """What each Ray worker runs: `engine.fit` with a `RayRuntime`.

    `config_dict`: {"config": TrainConfig.to_dict(), "sync_batchnorm": bool, "threads": int}.
    Returns fit's final metrics plus where the run resumed from (Ray keeps rank 0's return value).
    """
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One intra-op thread per CPU the worker holds: more only fight the other workers for cores.
    torch.set_num_threads(max(1, int(config_dict.get("threads", 1))))
    config = TrainConfig.from_dict(config_dict["config"])
    runtime = RayRuntime(config.output, resume=config.resume, sync_batchnorm=config_dict.get("sync_batchnorm", False))
    try:
        result = engine.fit(config, runtime)
    finally:
        runtime.close()
    return {**result, "resumed_from": runtime.restored_from, "world_size": runtime.world_size}


# -- the driver side -------------------------------------------------------------------------------


def _absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers run in their own working directories."""
    return uri if "://" in uri else os.path.abspath(uri)


def _run_config(storage_path: str, run_name: str, max_failures: int, keep_checkpoints: int | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    options: dict[str, Any] = {"storage_path": storage_path}
    if is_s3(storage_path):
        # pyarrow ignores AWS_ENDPOINT_URL: storage.pyarrow_filesystem_for passes the endpoint explicitly.
        from ssd_core.storage import pyarrow_filesystem_for

        filesystem, path = pyarrow_filesystem_for(storage_path)
        options = {"storage_path": path, "storage_filesystem": filesystem}
    return RunConfig(
        name=run_name,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        **options,
    )


def fit_distributed(
    config: TrainConfig,
    *,
    num_workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    sync_batchnorm: bool = False,
    keep_checkpoints: int | None = 3,
    train_loop: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Train `config` on `num_workers` Ray workers (one GPU each with `use_gpu`, else CPUs and gloo).

    `config.batch_size` is per worker; the learning rate default scales with the total batch.
    Checkpoints go to `storage_path` (default RUN_DIR/ray; s3://bucket/prefix works, custom endpoints
    from AWS_ENDPOINT_URL[_S3]) under `run_name` (default: RUN_DIR's name); running again with the same
    name and storage path and `config.resume` resumes from the latest one. `max_failures` worker failures are recovered
    from automatically. `resources_per_worker` defaults to {"CPU": 1} on CPU (Ray's 1 CPU + 1 GPU with
    `use_gpu`). `train_loop` replaces `train_loop_per_worker` (for instrumented runs).

    Returns rank 0's final metrics from `engine.fit`, plus "resumed_from", "ray_run" (the run's
    storage path) and "ray_checkpoint" (its latest checkpoint).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if config.device == "cuda" and not use_gpu:
        raise ValueError("device 'cuda' with Ray workers needs use_gpu=True (--gpu)")
    if sync_batchnorm and not use_gpu:
        raise ValueError("sync_batchnorm needs GPUs (torch's SyncBatchNorm does not run on CPU)")
    if config.time_budget_s is not None and num_workers > 1:
        # Each rank times itself, so ranks could stop on different steps and block each other in the
        # next all-reduce; until the engine agrees on the stop across ranks, refuse rather than hang.
        raise ValueError("time_budget_s is not supported with more than one Ray worker; use max_steps or epochs")
    config = replace(config, data=_absolute(config.data) if config.data else "", output=_absolute(config.output),
                     **{name: _absolute(value) for name in ("train_images", "train_annotations", "val_images",
                                                            "val_annotations") if (value := getattr(config, name))})
    # Configuration and download errors here, not in every worker.
    engine.prefetch_weights(config.resolved(num_workers))
    storage_path = _absolute(storage_path or join_uri(config.output, RAY_STORAGE_SUBDIR))
    run_name = run_name or os.path.basename(config.output.rstrip("/")) or "ssd"
    # Same rule as a local run: Ray's checkpoints of this run name count as the run, and --overwrite
    # deletes them too (Ray would otherwise resume from them).
    claim_run_folder(config.output, resume=config.resume, overwrite=config.overwrite,
                            also=[join_uri(storage_path, run_name)])
    if resources_per_worker is None and not use_gpu:
        resources_per_worker = {"CPU": 1}
    threads = int((resources_per_worker or {}).get("CPU", 1))

    # A local cluster gets at least the CPUs the workers ask for (Ray would otherwise wait forever).
    # The dashboard serves the State API, which Ray Train V2's placement-group cleaner polls every
    # second; without it every poll logs "Failed to query Ray Train Controller actor state".
    init_ray(num_cpus=max(os.cpu_count() or 1, num_workers * threads) if not use_gpu else None, dashboard=True)
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "sync_batchnorm": sync_batchnorm, "threads": threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=_run_config(storage_path, run_name, max_failures, keep_checkpoints),
    )
    log.info("Ray training %s: %d worker(s), %s, storage %s, run %s", config.arch, num_workers,
             "GPU/nccl" if use_gpu else "CPU/gloo", storage_path, run_name)
    result = trainer.fit()  # Ray Train V2 raises TrainingFailedError once max_failures are used up
    if result.error is not None:
        raise result.error
    _ensure_run_checkpoint(config.output, result.checkpoint)
    return {
        **(result.return_value or {}),
        "ray_run": result.path,
        "ray_checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "run_name": run_name,
        "num_workers": num_workers,
    }


def _ensure_run_checkpoint(output: str, checkpoint: Any) -> None:
    """RUN_DIR/last.pt from the final Ray checkpoint when rank 0 ran on another node (whose disk held
    its copy), so the driver can always load the run's model."""
    target = join_uri(output, CHECKPOINT_FILE)
    if checkpoint is None or exists(target):
        return
    with checkpoint.as_directory() as directory, open(os.path.join(directory, CHECKPOINT_FILE), "rb") as handle:
        atomic_write_bytes(target, handle.read())
