"""`TrainConfig`: one training run's settings, as `ssd train`, the flows and Ray workers pass them.

Fields left None take the architecture's recipe (`SSDConfig.recipe` in ssd_core.zoo), which follows
the anchors' recipes (torchvision's references/detection for SSD300/512 and SSDLite, NVIDIA's for
SSD300-ResNet50): SGD with momentum 0.9, linear warm-up, multistep or cosine decay, the anchors' weight
decay (none on norm and bias parameters), and the learning rate scaled linearly with the total batch
size. Schedules are fractions of the run, so a 5-epoch run decays where a 120-epoch one would, and
warm-up is capped at one epoch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ssd_core.precision import check_trainable

SCHEDULES = ("multistep", "cosine")


@dataclass
class TrainConfig:
    """A training run. Fields left None take the architecture's recipe (`SSDConfig.recipe`,
    ssd_core.zoo; see `resolved`)."""

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
        from ssd_core.zoo import CONFIGS

        if self.arch not in CONFIGS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(CONFIGS)}")
        recipe = CONFIGS[self.arch].recipe
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
