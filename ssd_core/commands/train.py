"""`ssd train`: train an SSD on a COCO-format dataset (locally, or on Ray workers with --workers N)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from typing import Any


def _size(text: str) -> list[int]:
    """"256" or "256x320" (H x W) -> [H, W]."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 32:
        raise argparse.ArgumentTypeError(f"--size must be N or HxW with sides >= 32, got {text!r}")
    return values * 2 if len(values) == 1 else values


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `ssd train` and `ssd bench learn` (all default to the TrainConfig/recipe value)."""
    from ssd_core.precision import TRAINING_PRECISIONS

    parser.add_argument("--arch", default=None, help="architecture (default ssdlite320_mobilenet_v3_large)")
    parser.add_argument("--data", metavar="DIR", help="dataset root (local or s3://) with "
                        "annotations/instances_{train,val}.json and {train,val}/, or COCO 2017 as downloaded "
                        "(annotations/instances_{train,val}2017.json, {train,val}2017/)")
    for split in ("train", "val"):
        parser.add_argument(f"--{split}-images", metavar="DIR", help=f"{split} image folder (local or s3://), "
                            f"with --{split}-annotations instead of --data's layout")
        parser.add_argument(f"--{split}-annotations", metavar="JSON", help=f"{split} COCO annotation file")
    parser.add_argument("--strict", action="store_true", help="fail on a missing or undecodable training image "
                        "(default: skip it with a warning and count it in metrics.jsonl)")
    parser.add_argument("--output", required=True, metavar="RUN_DIR", help="run directory (local or s3://)")
    parser.add_argument("--weights", default=None, metavar="W", help="start from these detector weights "
                        "(fine-tuning): a registry name (DEFAULT, COCO_V1; see `ssd weights list`), a path, s3:// or "
                        "https:// URL; other classes than the dataset's re-initialise the classification head")
    parser.add_argument("--weights-backbone", default=None, metavar="W", help="backbone weights when --weights is "
                        "not given: DEFAULT (the architecture's ImageNet backbone, the default), a registry name "
                        "(IMAGENET1K_V2...), a path or URL, or none to train from scratch")
    parser.add_argument("--trainable-backbone-layers", type=int, default=None, metavar="K",
                        help="backbone stages that train (default: all from scratch; 4 for a pretrained VGG/ResNet)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B", help="images per step (per worker)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate for the total batch "
                        "(default: the architecture's recipe, scaled linearly with the batch)")
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None, help="not applied to norm and bias parameters")
    parser.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up steps (capped at one epoch)")
    parser.add_argument("--schedule", choices=["multistep", "cosine"], default=None)
    parser.add_argument("--milestones", type=int, nargs="+", default=None, metavar="EPOCH",
                        help="multistep: epochs at which the lr is multiplied by --gamma")
    parser.add_argument("--gamma", type=float, default=None)
    parser.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: no clipping)")
    parser.add_argument("--precision", choices=list(TRAINING_PRECISIONS), default=None,
                        help="auto: bf16 on CPUs with AMX/AVX512-BF16 and on CUDA (fp16 where bf16 is missing)")
    parser.add_argument("--augment", choices=["ssd", "ssdlite", "flip", "none"], default=None,
                        help="ssd: photometric, zoom-out, IoU crop, flip; ssdlite: IoU crop, flip; flip: flip only")
    parser.add_argument("--size", type=_size, default=None, metavar="N|HxW", help="model input size override")
    parser.add_argument("--loader-workers", type=int, default=None, metavar="K", help="data loader processes")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None)
    parser.add_argument("--eval-max-images", type=int, default=None, metavar="N", help="evaluate on the first N val images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files in RUN_DIR/"
                        "tensorboard (metrics also go to MLflow when MLFLOW_TRACKING_URI is set)")


def config_from_args(args: argparse.Namespace, **defaults: Any) -> Any:
    """TrainConfig from the parsed options; options left unset keep `defaults`, then TrainConfig's."""
    from ssd_core.train_config import TrainConfig

    values: dict[str, Any] = dict(defaults)
    mapping = {
        "arch": "arch", "data": "data", "output": "output", "batch_size": "batch_size", "lr": "lr",
        "momentum": "momentum", "weight_decay": "weight_decay", "warmup_iters": "warmup_iters",
        "schedule": "schedule", "milestones": "milestones", "gamma": "gamma", "precision": "precision",
        "augment": "augment", "loader_workers": "workers", "seed": "seed", "device": "device",
        "eval_max_images": "eval_max_images", "epochs": "epochs", "checkpoint_every": "checkpoint_every",
        "eval_every": "eval_every", "max_steps": "max_steps", "weights": "weights",
        "weights_backbone": "weights_backbone", "trainable_backbone_layers": "trainable_backbone_layers",
        "train_images": "train_images",
        "train_annotations": "train_annotations", "val_images": "val_images", "val_annotations": "val_annotations",
    }
    for arg_name, field_name in mapping.items():
        value = getattr(args, arg_name, None)
        if value is not None:
            values[field_name] = value
    if getattr(args, "grad_clip", None) is not None:
        values["grad_clip"] = args.grad_clip or None
    if getattr(args, "gpu", False):
        values["device"] = "cuda"
    if args.size is not None:
        values["model"] = {**values.get("model", {}), "size": args.size}
    if getattr(args, "resume", False):
        values["resume"] = True
    if getattr(args, "overwrite", False):
        values["overwrite"] = True
    if getattr(args, "strict", False):
        values["strict"] = True
    if getattr(args, "no_tensorboard", False):
        values["tensorboard"] = False
    if args.no_progress:
        values["progress"] = False
    return TrainConfig.from_dict(values)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an SSD (progress bar, metrics.jsonl, curves.png, last.pt/best.pt checkpoints)",
        description="Train an SSD on a COCO-format dataset. Writes RUN_DIR/config.json, metrics.jsonl, "
        "curves.png, last.pt (every epoch and every --checkpoint-every steps) and best.pt (best AP); "
        "--resume continues a stopped run exactly where it stopped; a RUN_DIR that already holds a run is "
        "refused unless --resume or --overwrite is given.",
    )
    add_training_arguments(parser)
    parser.add_argument("--epochs", type=int, default=None, metavar="E")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    existing.add_argument("--overwrite", action="store_true", help="delete the run already in RUN_DIR (checkpoints, "
                          "metrics, Ray checkpoints) and start afresh; without --resume or --overwrite such a "
                          "RUN_DIR is refused")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="also checkpoint every STEPS steps (default: every epoch only)")
    parser.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS", help="0: only after the last epoch")
    parser.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="Ray training workers (distributed)")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA (one GPU per Ray worker)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.workers:
        if importlib.util.find_spec("ssd_core.distributed") is None:
            raise ValueError("--workers needs ssd_core.distributed (Ray training), which this installation lacks")
        from ssd_core.distributed import fit_distributed

        result = fit_distributed(config, num_workers=args.workers, use_gpu=args.gpu)
    else:
        from ssd_core.engine import fit

        result = fit(config)
    print(json.dumps(summary(result), indent=2))
    return 0


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a person wants to see at the end of a run: the 12 metrics, counters and paths."""
    return {k: v for k, v in result.items() if k != "per_class_AP" and not isinstance(v, dict | list)}
