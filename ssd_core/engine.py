"""The training loop: `train_one_epoch`, `evaluate` and `fit`, used by `ssd train` and by Ray workers.

Everything that depends on where the loop runs sits behind `Runtime` (device, rank, model wrapping,
loader sharding, checkpoint storage, metric reporting); `ssd_core.distributed` subclasses it for Ray
Train and calls the same `fit`. The run's settings are a `TrainConfig` (ssd_core.train_config), its
batches come from ssd_core.sampling, its files from ssd_core.runs.

Reproducibility. The batches of an epoch are a function of (seed, epoch) alone (ssd_core.sampling),
the LR schedule is per iteration, and a checkpoint holds model, optimizer, scheduler, scaler, counters
and RNG states: a run stopped mid-epoch and resumed ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import bisect
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ssd_core.checkpoint import (
    CHECKPOINT_VERSION,
    capture_rng_state,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from ssd_core.precision import resolve_device
from ssd_core.runs import MetricsLog, claim_run_folder, write_curves, write_json
from ssd_core.sampling import epoch_sampler, make_train_loader, probe_loader, steps_in_epoch
from ssd_core.storage import exists, join_uri
from ssd_core.train_config import TrainConfig

log = logging.getLogger(__name__)

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


# -- where the loop runs ---------------------------------------------------------------------------


class Runtime:
    """One local process: rank 0 of 1. Subclasses (Ray Train) override the hooks below.

    Side effects (evaluation, metrics.jsonl, curves, checkpoint files) happen on the main rank only;
    the engine calls `save_checkpoint` and `report` on every rank so that collective implementations
    (ray.train.report) see all workers.
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self, output: str, *, device: str = "auto", resume: bool = False) -> None:
        self.output = str(output).rstrip("/")
        self.device = resolve_device(device)
        self.resume = resume

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def claim_output(self, config: TrainConfig) -> None:
        """Refuse to start a fresh run over an existing one (see `claim_run_folder`)."""
        claim_run_folder(self.output, resume=config.resume, overwrite=config.overwrite)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device (Ray: and wrap in DistributedDataParallel)."""
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """The engine's loader already shards by (rank, world_size) through `EpochSampler`; Ray may
        only add device placement here, not a second sampler."""
        return loader

    def restore_checkpoint(self) -> str | None:
        """Path of the checkpoint to resume from, or None to start fresh."""
        path = join_uri(self.output, "last.pt")
        if self.resume and exists(path):
            return path
        if self.resume:
            log.warning("--resume: no checkpoint at %s; starting from scratch", path)
        return None

    def save_checkpoint(self, payload: dict[str, Any], tag: str, *, best: bool = False) -> None:
        """Atomically write RUN_DIR/last.pt (and best.pt when `best`). `tag` names the point, e.g.
        "epoch-0003" or "step-000120" (Ray uses it for the reported checkpoint's directory)."""
        if not self.is_main:
            return
        write_checkpoint(join_uri(self.output, "last.pt"), payload)
        if best:
            write_checkpoint(join_uri(self.output, "best.pt"), payload)

    def report(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics (local: already in metrics.jsonl, nothing more to do)."""

    def sum_over_ranks(self, value: int) -> int:
        """`value` summed over all ranks; a collective, so every rank calls it at the same step."""
        return value


# -- optimisation ----------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two SGD groups: weights with `weight_decay`; norm-layer parameters and biases without (decay
    would pull BatchNorm scales and offsets towards zero for no regularising benefit)."""
    no_decay_ids = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias":
                no_decay_ids.add(id(param))
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(
    *, total_steps: int, warmup_iters: int, warmup_factor: float, schedule: str, milestones: list[float],
    gamma: float, progress: Callable[[int], float] | None = None,
) -> Callable[[int], float]:
    """LR multiplier of step `step`: linear warm-up from `warmup_factor`, then cosine to 0 or x`gamma` at
    each milestone (fractions of the run). `progress(step)` -> 0..1 replaces step / total_steps
    (time-budgeted runs)."""

    def factor(step: int) -> float:
        done = progress(step) if progress is not None else step / max(total_steps, 1)
        done = min(max(done, 0.0), 1.0)
        warm = 1.0 if step >= warmup_iters else warmup_factor + (1 - warmup_factor) * step / warmup_iters
        if schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * done))
        else:
            decay = gamma ** bisect.bisect_right(milestones, done)
        return warm * decay

    return factor


class Stopwatch:
    """Training time (evaluation and checkpointing excluded) carried across resumes."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self.before, self.started = elapsed, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None:
            self.before += time.perf_counter() - self.started
            self.started = None

    def elapsed(self) -> float:
        running = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.before + running


@dataclass
class TrainState:
    """Progress counters saved in checkpoints. `epoch` is the epoch in progress, `batch_in_epoch` the
    batches of it already done; `step` counts optimizer steps over the run."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_ap: float = -1.0
    train_time_s: float = 0.0
    stop_reason: str | None = None
    skipped_images: int = 0  # unreadable training images skipped (all ranks), counted when logged


def unwrap(model: nn.Module) -> nn.Module:
    """The SSD inside a DistributedDataParallel (or any `.module`) wrapper."""
    return getattr(model, "module", model)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    *,
    epoch: int,
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    config: TrainConfig,
    stopwatch: Stopwatch,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> dict[str, float]:
    """Train over the rest of epoch `epoch` (from `state.batch_in_epoch`), updating `state` per step.

    Stops early at `config.max_steps` / `config.time_budget_s` / `config.train_steps` (setting
    `state.stop_reason`).
    `on_log(record)` receives a train record every `config.log_every` steps; `on_step(state)` runs
    after every step (periodic checkpoints). Returns the epoch's mean losses and images/s.
    """
    from tqdm.auto import tqdm

    model.train()
    num_steps = steps_in_epoch(loader, config)
    epoch_sampler(loader).set_epoch(epoch, state.batch_in_epoch * config.batch_size)
    remaining = num_steps - state.batch_in_epoch
    bar = tqdm(total=num_steps, initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="batch", disable=not (config.progress and runtime.is_main), dynamic_ncols=True,
               # Not a terminal (a Ray worker forwarding its output, CI logs): every update is a new line.
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    totals = {"loss": 0.0, "bbox_regression": 0.0, "classification": 0.0}
    window = dict.fromkeys(totals, 0.0)
    window_steps, window_images, window_start = 0, 0, time.perf_counter()
    window_skipped, warned = 0, set()
    epoch_images, epoch_steps = 0, 0
    stopwatch.start()
    epoch_start = time.perf_counter()
    try:
        batches = iter(loader)
        for _ in range(remaining):
            images, targets = next(batches)
            for entry in (entry for target in targets for entry in target.get("skipped_images", ())):
                window_skipped += 1
                if entry not in warned:  # once per image and epoch; every skip is counted
                    warned.add(entry)
                    log.warning("skipped an unreadable training image (--strict fails instead): %s", entry)
            losses = training_step(model, optimizer, scheduler, scaler, images, targets, runtime.device, config)
            state.step += 1
            state.batch_in_epoch += 1
            epoch_steps += 1
            epoch_images += len(images) * runtime.world_size
            window_steps += 1
            window_images += len(images) * runtime.world_size
            for key, value in losses.items():
                totals[key] += value
                window[key] += value
            state.train_time_s = stopwatch.elapsed()
            if state.step % config.log_every == 0 or state.batch_in_epoch == num_steps:
                skipped = runtime.sum_over_ranks(window_skipped)
                state.skipped_images += skipped
                now = time.perf_counter()
                record = {
                    "kind": "train", "epoch": epoch, "step": state.step,
                    **{key: value / window_steps for key, value in window.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                    "skipped_images": skipped,
                }
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_s']:.1f}")
                if on_log is not None:
                    on_log(record)
                window = dict.fromkeys(totals, 0.0)
                window_steps, window_images, window_skipped, window_start = 0, 0, 0, now
            bar.update(1)
            if config.max_steps is not None and state.step >= config.max_steps:
                state.stop_reason = "max_steps"
            elif config.time_budget_s is not None and state.train_time_s >= config.time_budget_s:
                state.stop_reason = "time_budget"
            elif config.train_steps is not None and state.step >= config.train_steps:
                state.stop_reason = "train_steps"
            if on_step is not None:
                stopwatch.stop()
                on_step(state)
                stopwatch.start()
            if state.stop_reason:
                break
    finally:
        stopwatch.stop()
        state.train_time_s = stopwatch.elapsed()
        bar.close()
    seconds = time.perf_counter() - epoch_start
    summary = {key: value / max(epoch_steps, 1) for key, value in totals.items()}
    summary["images_per_s"] = epoch_images / max(seconds, 1e-9)
    return summary


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler, images: list[Tensor], targets: list[dict[str, Any]], device: torch.device,
    config: TrainConfig,
) -> dict[str, float]:
    """One optimizer step on a batch; returns the losses as floats. The model runs its forward in its
    own precision (autocast inside `SSD.forward_head`); the scaler is live for fp16 only."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    losses = model(images, targets)
    loss = losses["bbox_regression"] + losses["classification"]
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} (bbox_regression {losses['bbox_regression'].item():.4g}, classification "
            f"{losses['classification'].item():.4g}); lower the learning rate (now {optimizer.param_groups[0]['lr']:.4g})"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.grad_clip is not None:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(grad_norm) and not scaler.is_enabled():
            # fp16's scaler skips such steps itself; for fp32/bf16 we do the same rather than write NaNs.
            log.warning("skipping a step with a non-finite gradient norm (%s)", grad_norm.item())
            optimizer.zero_grad(set_to_none=True)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": loss.item(), **{key: value.item() for key, value in losses.items()}}


# -- evaluation ------------------------------------------------------------------------------------


def evaluate(
    model: nn.Module, dataset: Dataset, runtime: Runtime, *, batch_size: int = 16, workers: int = 2,
    max_images: int | None = None, progress: bool = True,
) -> dict[str, Any] | None:
    """COCO metrics (ssd_core.evaluation.evaluate_model) of the unwrapped model on `dataset`, on the
    main rank; other ranks return None. The 12 metrics plus per_class_AP."""
    if not runtime.is_main:
        return None
    from ssd_core.evaluation import evaluate_model, scalar_metrics

    metrics = evaluate_model(unwrap(model), dataset, batch_size=batch_size, workers=workers, progress=progress,
                             max_images=max_images)
    return {**scalar_metrics(metrics), "per_class_AP": metrics["per_class_AP"]}


# -- the run ---------------------------------------------------------------------------------------


def build_datasets(config: TrainConfig, size: tuple[int, int]) -> tuple[Dataset, Dataset]:
    """Train split with the augmentation preset and val split without, both resized to the model's
    input `size` in the loader workers (so the model's own resize is a no-op)."""
    from ssd_core.data import CocoDataset, build_preset

    def split(name: str, preset: str) -> Dataset:
        images, annotations = config.split_location(name)
        return CocoDataset(config.data, name, transforms=build_preset(preset, size=size),
                           annotation_file=annotations, image_folder=images)

    return split("train", config.augment), split("val", "none")


def build_model_for(config: TrainConfig, class_names: list[str], payload: dict[str, Any] | None) -> nn.Module:
    """A model for the dataset's classes, from `config.weights` / `config.weights_backbone` (or
    scratch), or the one in a resumed checkpoint (with the same layers frozen)."""
    from ssd_core.zoo import build_model, default_trainable_layers, model_from_checkpoint, resolve_config

    trainable = config.trainable_backbone_layers
    if trainable is None:
        pretrained = config.weights is not None or config.weights_backbone is not None
        trainable = default_trainable_layers(resolve_config(config.arch, config.model), pretrained=pretrained)
    if payload is not None:
        model = model_from_checkpoint(payload, precision=config.precision, source="resumed checkpoint",
                                      trainable_backbone_layers=trainable)
    else:
        model = build_model(config.arch, num_classes=len(class_names), class_names=class_names,
                            weights=config.weights, weights_backbone=config.weights_backbone,
                            trainable_backbone_layers=trainable, precision=config.precision,
                            progress=config.progress, **config.model)
    model.int8_state = None  # an int8 calibration (`ssd quantize`) fits the weights it was made on, not trained ones
    return model


def prefetch_weights(config: TrainConfig) -> None:
    """Fetch the run's starting weights into this machine's cache before workers start (a download
    failure is one line here, and local workers read the cache). Nothing to fetch when resuming."""
    from ssd_core.weights import weights_file

    if exists(join_uri(config.output, "last.pt")):
        return
    if config.weights is not None:
        weights_file(config.weights, config.arch, progress=config.progress)
    elif config.weights_backbone is not None:
        weights_file(config.weights_backbone, config.arch, backbone=True, progress=config.progress)


def training_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    state: TrainState, config: TrainConfig, metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """`zoo.checkpoint_payload` (the model alone) plus what resuming the run needs."""
    from ssd_core.zoo import checkpoint_payload as model_payload

    return {
        **model_payload(unwrap(model), config.model),
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": asdict(state),
        "rng": capture_rng_state(),
        "metrics": {k: v for k, v in (metrics or {}).items() if k != "per_class_AP"},
    }


def fit(config: TrainConfig, runtime: Runtime | None = None) -> dict[str, Any]:
    """Train `config` to the end (or to max_steps / train_steps / the time budget), evaluating every `eval_every`
    epochs and after the last; returns the final metrics (12 COCO metrics, losses, counters, paths)."""
    runtime = runtime or Runtime(config.output, device=config.device, resume=config.resume)
    config = config.resolved(runtime.world_size)
    if config.threads:
        torch.set_num_threads(config.threads)
    runtime.claim_output(config)
    resume_from = runtime.restore_checkpoint()
    payload = read_checkpoint(resume_from) if resume_from else None
    if payload is not None:
        log.info("resuming from %s (epoch %d, step %d)", resume_from, payload["state"]["epoch"] + 1,
                 payload["state"]["step"])
        saved = payload["config"]
        if (saved["arch"], saved.get("model")) != (config.arch, config.model):
            raise ValueError(f"--resume: {resume_from} trained {saved['arch']} {saved.get('model')}, "
                             f"not {config.arch} {config.model}")
        torch.manual_seed(config.seed)
    else:
        torch.manual_seed(config.seed)  # model initialisation

    # Data first: the model's classes come from the dataset.
    from ssd_core.zoo import resolve_config

    size = tuple(resolve_config(config.arch, config.model).size)
    train_set, val_set = build_datasets(config, size)
    model = build_model_for(config, train_set.class_names, payload)
    precision = model.effective_precision(runtime.device)
    if precision == "bf16" and runtime.device.type == "cpu":
        # Workaround: with channels_last weights, oneDNN's bf16 backward of a depthwise conv on a 1-2 px
        # feature map (SSDLite's last extra blocks) now and then returns garbage weight gradients (1e32,
        # inf; differs from run to run). Contiguous weights do not; the input stays channels_last.
        model.to(memory_format=torch.contiguous_format)
    model = runtime.prepare_model(model)
    loader = runtime.prepare_loader(make_train_loader(
        train_set, config.batch_size, workers=config.workers, seed=config.seed, rank=runtime.rank,
        world_size=runtime.world_size, strict=config.strict,
    ))
    steps_per_epoch = steps_in_epoch(loader, config)
    if steps_per_epoch == 0:
        raise ValueError(f"{train_set.annotation_path}: {len(train_set)} training images make no full batch of {config.batch_size}"
                         f" per worker ({runtime.world_size} workers); lower --batch-size")
    warmup = min(config.warmup_iters, steps_per_epoch)

    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    state = TrainState()
    if payload is not None:
        state = TrainState(**payload["state"])
        state.stop_reason = None
    stopwatch = Stopwatch(state.train_time_s)
    progress = None
    if config.time_budget_s is not None:
        progress = lambda _step: stopwatch.elapsed() / config.time_budget_s  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        total_steps=config.train_steps or config.epochs * steps_per_epoch, warmup_iters=warmup, warmup_factor=config.warmup_factor,
        schedule=config.schedule, milestones=[m / config.epochs for m in config.milestones], gamma=config.gamma,
        progress=progress,
    ))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=precision == "fp16")
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
    del payload

    metrics_log = MetricsLog(config.output, resume_step=state.step if resume_from else None,
                             config=config.to_dict()) if runtime.is_main else None
    if runtime.is_main:
        write_json(join_uri(config.output, "config.json"), config.to_dict())
        log.info("training %s on %s: %d images, %d classes, %d steps/epoch, lr %.4g, %s, precision %s, device %s",
                 config.arch, train_set.annotation_path, len(train_set), len(train_set.class_names) - 1, steps_per_epoch,
                 config.lr, config.schedule, precision, runtime.device)
    loader_rate = probe_loader(loader, config) if runtime.is_main else None

    last_eval: dict[str, Any] | None = None
    last_summary: dict[str, float] = {}

    def log_record(record: dict[str, Any]) -> None:
        if metrics_log is not None:
            metrics_log.append(record)

    def save(tag: str, *, best: bool = False, metrics: dict[str, Any] | None = None) -> None:
        runtime.save_checkpoint(
            training_checkpoint(model, optimizer, scheduler, scaler, state, config, metrics or last_eval), tag,
            best=best,
        )

    def periodic_checkpoint(current: TrainState) -> None:
        if current.stop_reason or (config.checkpoint_every and current.step % config.checkpoint_every == 0):
            if current.batch_in_epoch < steps_per_epoch:  # the end of an epoch is saved after its evaluation
                save(f"step-{current.step:06d}")

    while state.epoch < config.epochs and state.stop_reason is None:
        epoch = state.epoch
        last_summary = train_one_epoch(
            model, optimizer, scheduler, loader, epoch=epoch, runtime=runtime, scaler=scaler, state=state,
            config=config, stopwatch=stopwatch, on_log=log_record, on_step=periodic_checkpoint,
        )
        if state.batch_in_epoch < steps_per_epoch:
            break  # stopped mid-epoch (max_steps / time budget): checkpoint already written
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        final = state.epoch >= config.epochs or state.stop_reason is not None
        is_best = False
        if final or (config.eval_every and state.epoch % config.eval_every == 0):
            metrics = evaluate(model, val_set, runtime, batch_size=config.eval_batch_size, workers=config.workers,
                               max_images=config.eval_max_images, progress=config.progress)
            if metrics is not None:
                last_eval = metrics
                ap = metrics["AP"] if metrics["AP"] is not None else -1.0
                is_best = ap > state.best_ap
                state.best_ap = max(state.best_ap, ap)
                log_record({"kind": "eval", "epoch": epoch, "step": state.step,
                            **{k: v for k, v in metrics.items() if k != "per_class_AP"}})
                log.info("epoch %d: loss %.4f, %.1f img/s, AP %.4f, AP50 %.4f", epoch + 1, last_summary["loss"],
                         last_summary["images_per_s"], metrics["AP"] or 0.0, metrics["AP50"] or 0.0)
                write_curves(config.output)
        save(f"epoch-{state.epoch:04d}", best=is_best)
        runtime.report({"epoch": epoch, "step": state.step, **last_summary,
                        **{k: v for k, v in (last_eval or {}).items() if k != "per_class_AP"}})

    if state.stop_reason in ("time_budget", "train_steps") and runtime.is_main and state.batch_in_epoch:
        # A run of a time budget or a step count ends mid-epoch; it still gets its final evaluation.
        last_eval = evaluate(model, val_set, runtime, batch_size=config.eval_batch_size, workers=config.workers,
                             max_images=config.eval_max_images, progress=config.progress)
        log_record({"kind": "eval", "epoch": state.epoch, "step": state.step,
                    **{k: v for k, v in last_eval.items() if k != "per_class_AP"}})
        write_curves(config.output)
        save(f"step-{state.step:06d}", best=(last_eval["AP"] or -1.0) > state.best_ap)

    train_rate = last_summary.get("images_per_s")
    if runtime.is_main and loader_rate is not None and train_rate:
        log.info("throughput: loader %.1f img/s (%d workers) vs training %.1f img/s: loading %s the bottleneck",
                 loader_rate, config.workers, train_rate, "is" if loader_rate < train_rate else "is not")
        log_record({"kind": "throughput", "step": state.step, "loader_images_per_s": loader_rate,
                    "train_images_per_s": train_rate})
    result = {
        **(last_eval or {}),
        **{f"train_{k}": v for k, v in last_summary.items()},
        "epoch": state.epoch, "step": state.step, "train_time_s": state.train_time_s,
        "stop_reason": state.stop_reason or "completed", "loader_images_per_s": loader_rate,
        "skipped_images": state.skipped_images,
        "checkpoint": join_uri(config.output, "last.pt"), "precision": precision,
    }
    if metrics_log is not None:
        metrics_log.close(result)
    return result
