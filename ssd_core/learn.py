"""`ssd bench learn`: train from scratch on the synthetic shapes set under a wall-clock budget and show
that the detector really learns (COCO AP50 on the val split), then compare fp32 and bf16 evaluation
of the trained checkpoint.

The recipe (`LEARN_RECIPE`) is chosen for a 2-core CPU and a 15-minute budget:

- ssdlite320_mobilenet_v3_large: the cheapest member of the family per image (depthwise convs, about
  a tenth of SSD300's FLOPs) and all-BatchNorm, so it trains from scratch at a high learning rate.
- input 224 x 224 instead of 320: half the pixels, about twice the steps in the budget. The shapes
  are simple enough that resolution matters less than the number of updates.
- anchors from 0.1 (22 px) instead of 0.2 of the input: the synthetic set has COCO-small objects
  (17-30 px in the file, 12-20 px at 224) that the stock 45 px smallest anchor matches badly.
- bf16 autocast (`precision="auto"` on CPUs with AVX512-BF16/AMX): 1.3x the fp32 step rate measured
  here (0.61 vs 0.80 CPU-s per 16-image step at 160 px, one thread).
- batch 32, SGD lr 0.15 (momentum 0.9, wd 4e-5, none on norm/bias), 50 warm-up steps, cosine decay
  that reaches 0 exactly at the deadline (the schedule runs on training time, not steps).
- augmentation "ssdlite" (IoU crop + flip), one loader process (the other core trains).

Training time excludes evaluation; the run stops at the deadline, evaluates, and leaves
RUN_DIR/last.pt like any `ssd train` run, plus RUN_DIR/learn.json with the verdict.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

LEARN_RECIPE: dict[str, Any] = {
    "arch": "ssdlite320_mobilenet_v3_large",
    "weights_backbone": None,  # from scratch: the benchmark measures learning, and runs offline
    "model": {"size": [224, 224], "min_ratio": 0.1, "max_ratio": 0.9},
    "batch_size": 32,
    "lr": 0.15,
    "warmup_iters": 50,
    "schedule": "cosine",
    "weight_decay": 4e-5,
    "augment": "ssdlite",
    "precision": "auto",
    "workers": 1,
    "epochs": 1000,  # bounded by the time budget
    "eval_every": 2,
    "checkpoint_every": 50,
}
TARGET_AP50 = 0.7
MAX_PRECISION_GAP_POINTS = 0.5


def compare_precisions(
    checkpoint: str, data: str, *, precisions: tuple[str, ...] = ("fp32", "bf16"), batch_size: int = 16,
    workers: int = 1, max_images: int | None = None, progress: bool = False,
) -> dict[str, Any]:
    """COCO metrics of one checkpoint evaluated in each precision on `data`'s val split, and the largest
    AP / AP50 gap between them in points (0-100 scale)."""
    from ssd_core.data import CocoDataset, build_preset
    from ssd_core.evaluation import evaluate_model, scalar_metrics
    from ssd_core.zoo import load_model

    by_precision: dict[str, dict[str, Any]] = {}
    dataset = None
    for precision in precisions:
        model = load_model(checkpoint, precision=precision)
        if dataset is None:
            dataset = CocoDataset(data, "val", transforms=build_preset("none", size=model.size))
        metrics = evaluate_model(model, dataset, batch_size=batch_size, workers=workers, progress=progress,
                                 max_images=max_images)
        by_precision[precision] = scalar_metrics(metrics)
    gaps = {
        key: 100 * (max(m[key] or 0.0 for m in by_precision.values()) - min(m[key] or 0.0 for m in by_precision.values()))
        for key in ("AP", "AP50")
    }
    return {"metrics": by_precision, "gap_points": gaps}


def learn(
    data: str, output: str, *, minutes: float = 15.0, target_ap50: float = TARGET_AP50, compare: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train `LEARN_RECIPE` (updated with `overrides`, TrainConfig fields) from scratch on `data` for
    `minutes` of training time; returns and writes RUN_DIR/learn.json with the final metrics, whether
    AP50 reached `target_ap50`, and (with `compare`) the fp32-vs-bf16 evaluation gap."""
    from ssd_core.engine import TrainConfig, fit
    from ssd_core.storage import atomic_write_bytes, join_uri

    if minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    recipe = {**LEARN_RECIPE, **overrides}
    config = TrainConfig.from_dict({**recipe, "data": data, "output": output, "time_budget_s": 60.0 * minutes})
    result = fit(config)
    report: dict[str, Any] = {
        "recipe": config.to_dict(),
        "minutes": minutes,
        "train_time_s": result["train_time_s"],
        "steps": result["step"],
        "epochs_done": result["epoch"],
        "metrics": {k: result.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")},
        "target_AP50": target_ap50,
        "reached_target": (result.get("AP50") or 0.0) >= target_ap50,
        "checkpoint": result["checkpoint"],
        "train_images_per_s": result.get("train_images_per_s"),
        "loader_images_per_s": result.get("loader_images_per_s"),
    }
    if compare:
        comparison = compare_precisions(result["checkpoint"], data, workers=config.workers)
        report["precision_comparison"] = comparison
        report["precision_gap_ok"] = max(comparison["gap_points"].values()) <= MAX_PRECISION_GAP_POINTS
    atomic_write_bytes(join_uri(output, "learn.json"), (json.dumps(report, indent=2) + "\n").encode())
    return report


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `learn` to the `ssd bench` sub-commands (called by ssd_core/commands/bench.py)."""
    parser = bench_subparsers.add_parser(
        "learn",
        help="train from scratch on the synthetic set within a time budget; AP50 must reach 0.7",
        description="Train ssdlite (224 px, bf16, cosine over the budget) from scratch on a dataset written by "
        "`ssd data synth`, stop at the deadline, evaluate on its val split, compare fp32 and bf16 evaluation, "
        "and write RUN_DIR/learn.json next to the usual run files (last.pt, metrics.jsonl, curves.png).",
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root (e.g. from `ssd data synth`)")
    parser.add_argument("--output", required=True, metavar="RUN_DIR")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget (evaluation excluded)")
    parser.add_argument("--target-ap50", type=float, default=TARGET_AP50)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--size", type=int, default=None, help="square input size (default 224)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--no-compare", action="store_true", help="skip the fp32-vs-bf16 evaluation")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for name in ("batch_size", "lr", "precision", "threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.size is not None:
        overrides["model"] = {**LEARN_RECIPE["model"], "size": [args.size, args.size]}
    if args.no_progress:
        overrides["progress"] = False
    report = learn(args.data, args.output, minutes=args.minutes, target_ap50=args.target_ap50,
                   compare=not args.no_compare, **overrides)
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))
    return 0 if report["reached_target"] else 1
