"""The training loop: `train_one_epoch`, `evaluate` and `fit`, used by `ssd train` and by Ray workers.

Everything that depends on where the loop runs sits behind `Runtime` (device, rank, model wrapping,
loader sharding, checkpoint storage, metric reporting); `ssd_core.distributed` subclasses it for Ray
Train and calls the same `fit`.

Reproducibility. The batches of an epoch are a function of (seed, epoch) alone: `EpochSampler`
draws the permutation from them and hands each index to the dataset together with a per-sample seed
that `SeededSamples` uses for that sample's augmentation. So a resumed run skips the batches already
done and sees exactly the remaining ones, whatever the number of loader workers. The LR schedule is
per iteration, and a checkpoint holds model, optimizer, scheduler, scaler, counters and RNG states:
a run stopped mid-epoch and resumed ends with the weights of an uninterrupted run.

Defaults (`RECIPES`) follow the anchors' recipes (torchvision's references/detection for SSD300/512
and SSDLite, NVIDIA's for SSD300-ResNet50): SGD with momentum 0.9, linear warm-up, multistep or
cosine decay, the anchors' weight decay (none on norm and bias parameters), and the learning rate
scaled linearly with the total batch size. Schedules are fractions of the run, so a 5-epoch run
decays where a 120-epoch one would, and warm-up is capped at one epoch.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ssd_core.checkpoint import (
    CHECKPOINT_VERSION,
    capture_rng_state,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from ssd_core.precision import check_trainable, resolve_device
from ssd_core.storage import atomic_write_bytes, exists, is_s3, join_uri

log = logging.getLogger(__name__)

SCHEDULES = ("multistep", "cosine")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """An architecture's training defaults. `lr_per_32`: learning rate for a total batch of 32
    images (scaled linearly with the batch); `milestones`: fractions of the run (multistep)."""

    lr_per_32: float
    weight_decay: float
    schedule: str
    milestones: tuple[float, ...]
    warmup_iters: int
    augment: str


# torchvision: SSD300 lr 0.002 at 4 x 8 GPUs, wd 5e-4, steps at epochs 80 and 110 of 120, 1000 warm-up
# iterations. NVIDIA SSD300-ResNet50: lr 2.6e-3 per 32, wd 5e-4, 300 warm-up iterations, steps at 43 and
# 54 of 65. torchvision SSDLite: lr 0.15 at 24 x 8 GPUs (0.025 per 32), wd 4e-5, cosine over 600 epochs;
# for short from-scratch runs we use 0.1 per 32: at 0.025 a few-epoch run has barely started (measured
# with `ssd bench learn`, see ssd_core/learn.py).
RECIPES: dict[str, Recipe] = {
    "ssd300_vgg16": Recipe(0.002, 5e-4, "multistep", (80 / 120, 110 / 120), 1000, "ssd"),
    "ssd512_vgg16": Recipe(0.002, 5e-4, "multistep", (80 / 120, 110 / 120), 1000, "ssd"),
    "ssd300_resnet50": Recipe(2.6e-3, 5e-4, "multistep", (43 / 65, 54 / 65), 300, "ssd"),
    "ssdlite320_mobilenet_v3_large": Recipe(0.1, 4e-5, "cosine", (), 1000, "ssdlite"),
    "ssdlite300_mobilenet_v2": Recipe(0.1, 4e-5, "cosine", (), 1000, "ssdlite"),
}


@dataclass
class TrainConfig:
    """A training run. Fields left None take the architecture's `RECIPES` entry (see `resolved`)."""

    arch: str = "ssdlite320_mobilenet_v3_large"
    data: str = ""  # dataset root: the project's layout or COCO 2017's (see ssd_core.data.coco)
    # Explicit split locations (local or s3://), each pair instead of `data`'s layout for its split.
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    output: str = "runs/ssd"
    epochs: int = 10
    batch_size: int = 16  # per worker
    lr: float | None = None  # total-batch learning rate; None: recipe lr_per_32 * total batch / 32
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_iters: int | None = None  # None: the recipe's, capped at one epoch
    warmup_factor: float = 0.001
    schedule: str | None = None  # multistep | cosine
    milestones: list[int] | None = None  # epochs (multistep); None: the recipe's fractions of `epochs`
    gamma: float = 0.1
    grad_clip: float | None = 10.0  # max global gradient norm; None: no clipping
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (see ssd_core.precision; int8 is for inference only)
    workers: int = 2  # loader processes per training worker
    seed: int = 0
    augment: str | None = None  # ssd | ssdlite | none
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    eval_every: int = 1  # epochs; 0: only after the last epoch
    eval_batch_size: int = 16
    eval_max_images: int | None = None
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total, like a preemption
    time_budget_s: float | None = None  # stop training after this much training time; the schedule spans it
    train_steps: int | None = None  # stop after this many steps in total; the schedule spans them (not epochs)
    log_every: int = 10  # steps between metrics.jsonl train records
    loader_probe_batches: int = 5  # batches timed to log loader throughput once per run; 0: skip
    model: dict[str, Any] = field(default_factory=dict)  # SSDConfig overrides, e.g. {"size": [256, 256]}
    # Starting point (ssd_core.weights specs: registry name, path, s3:// or https:// URL). `weights`: a
    # detector to fine-tune (other classes re-initialise its classification head); else the backbone
    # `weights_backbone` ("DEFAULT": the architecture's ImageNet backbone; None or "none": from scratch).
    weights: str | None = None
    weights_backbone: str | None = "DEFAULT"
    trainable_backbone_layers: int | None = None  # None: all from scratch; pretrained VGG/ResNet 4, MobileNets 6
    device: str = "auto"  # cpu | cuda | auto
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    resume: bool = False
    overwrite: bool = False  # start afresh in a run folder that already holds a run (its files are deleted)
    strict: bool = False  # fail on a missing or undecodable training image instead of skipping it
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard (MLflow: set MLFLOW_TRACKING_URI)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists: what JSON and weights_only hold

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)

    def resolved(self, world_size: int = 1) -> TrainConfig:
        """A copy with every recipe default filled in and the values checked."""
        if self.arch not in RECIPES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.arch]
        values = self.to_dict()
        if values["lr"] is None:
            values["lr"] = recipe.lr_per_32 * self.batch_size * world_size / 32
        if values["weight_decay"] is None:
            values["weight_decay"] = recipe.weight_decay
        if values["schedule"] is None:
            values["schedule"] = recipe.schedule
        if values["augment"] is None:
            values["augment"] = recipe.augment
        if values["milestones"] is None:
            values["milestones"] = sorted({max(1, round(f * self.epochs)) for f in recipe.milestones})
        if values["warmup_iters"] is None:
            values["warmup_iters"] = recipe.warmup_iters  # capped at one epoch once its length is known
        for name in ("weights", "weights_backbone"):
            if isinstance(values[name], str) and values[name].strip().lower() in ("", "none"):
                values[name] = None
        config = TrainConfig.from_dict(values)
        config.validate()
        return config

    def split_location(self, split: str) -> tuple[str | None, str | None]:
        """(images, annotations) given explicitly for `split` ("train" or "val"), else (None, None)."""
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_annotations")

    def validate(self) -> None:
        for split in ("train", "val"):
            images, annotations = self.split_location(split)
            if (images is None) != (annotations is None):
                raise ValueError(f"--{split}-images and --{split}-annotations go together; got only "
                                 f"{'--' + split + '-images' if images else '--' + split + '-annotations'}")
            if images is None and not self.data:
                raise ValueError(f"data: a dataset directory (local or s3://) is required, or --{split}-images "
                                 f"and --{split}-annotations")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in (None, *SCHEDULES):
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.workers < 0:
            raise ValueError(f"workers (loader processes) must be >= 0, got {self.workers}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        check_trainable(self.precision)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or replace it")


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


# -- data: reproducible, resumable batches ---------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of batch and worker layout)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (augmentation seed, dataset index) for one epoch of one rank.

    The order is a permutation drawn from (seed, epoch) (identity when not shuffling), padded to a
    multiple of `world_size` and dealt out rank::world_size like DistributedSampler; `set_epoch(epoch,
    start)` also skips the first `start` samples of this rank (resuming mid-epoch).
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> Tensor:
        """Dataset indices of this rank for the current epoch (before skipping `start`)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        padded = math.ceil(self.num_samples / self.world_size) * self.world_size
        order = torch.cat([order, order[: padded - self.num_samples]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :].tolist():
            yield sample_seed(self.seed, self.epoch, index), index

    def __len__(self) -> int:
        return max(0, math.ceil(self.num_samples / self.world_size) - self.start)


class SeededSamples(Dataset):
    """`dataset[index]` with torch's RNG seeded per sample (its transforms draw from torch's RNG), so
    augmentation depends on the (seed, index) key only. The caller's RNG state is left untouched.

    An image that is missing or cannot be decoded (`UnreadableImageError`) is replaced by the next
    readable one (index + 1, + 2, ...; the same for every run), so batches stay full and DDP ranks stay
    in step; the replacement's target lists the skipped "path: reason" strings under "skipped_images".
    `strict` raises instead.
    """

    max_replacements = 16

    def __init__(self, dataset: Dataset, *, strict: bool = False) -> None:
        self.dataset = dataset
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        from ssd_core.data.coco import UnreadableImageError

        seed, index = key
        skipped: list[str] = []
        for offset in range(min(self.max_replacements, len(self.dataset))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    image, target = self.dataset[(index + offset) % len(self.dataset)]
                except UnreadableImageError as exc:
                    if self.strict:
                        raise
                    skipped.append(str(exc))
                    continue
            if skipped:
                target["skipped_images"] = skipped
            return image, target
        raise ValueError(f"{len(skipped)} unreadable images in a row, from dataset index {index}: "
                         f"{'; '.join(skipped[:3])}")


def make_train_loader(
    dataset: Dataset, batch_size: int, *, workers: int, seed: int, rank: int = 0, world_size: int = 1,
    strict: bool = False,
) -> DataLoader:
    """Loader of full batches (drop_last: BatchNorm and step counts need them) over an `EpochSampler`;
    its sampler is `loader.batch_sampler.sampler`."""
    from ssd_core.data.loader import make_loader

    sampler = EpochSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    # Only worker base seeds come from the loader's generator: augmentation is seeded per sample.
    return make_loader(SeededSamples(dataset, strict=strict), batch_size, workers=workers, seed=seed,
                       drop_last=True, sampler=sampler)


def epoch_sampler(loader: DataLoader) -> EpochSampler:
    return loader.batch_sampler.sampler


def steps_in_epoch(loader: DataLoader, config: TrainConfig) -> int:
    full = len(epoch_sampler(loader).order()) // config.batch_size
    return full if config.max_steps_per_epoch is None else min(full, config.max_steps_per_epoch)


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


# -- run files ----------------------------------------------------------------------------------------


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


def probe_loader(loader: DataLoader, config: TrainConfig) -> float | None:
    """Loader-only images/s over a few batches of an unused epoch (the sampler is reset afterwards)."""
    if not config.loader_probe_batches:
        return None
    from ssd_core.data import measure_loader_throughput

    sampler = epoch_sampler(loader)
    saved = (sampler.epoch, sampler.start)
    sampler.set_epoch(10**6)  # a throw-away epoch: the probe must not touch the run's batches
    batches = min(config.loader_probe_batches, len(loader) - 1)
    try:
        rate = measure_loader_throughput(loader, batches) if batches > 0 else None
    finally:
        sampler.set_epoch(*saved)
    if rate is not None:
        log.info("loader: %.1f images/s with %d worker(s)", rate, config.workers)
    return rate
