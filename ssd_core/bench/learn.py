"""`ssd bench learn`: train from scratch on the synthetic shapes set under a wall-clock budget (or a
fixed number of steps), show that the detector really learns (COCO metrics on the val split), and
train torchvision's own SSDLite with its plain recipe on the same data, budget and threads as the
anchor; then compare fp32 and bf16 evaluation of our checkpoint.

`LEARN_RECIPE` is ours, for a 2-core CPU and a 15-minute budget (how it was chosen: docs/training.md).
`TORCHVISION_RECIPE` is the anchor: torchvision's `ssdlite320_mobilenet_v3_large` from scratch, SGD
with torchvision's SSDLite settings, horizontal flips only, bf16 autocast, images decoded once up
front, evaluated with pycocotools on the same val split.

`ablate` trains one recipe change at a time at a fixed step count on several datasets (the step
count does not depend on how busy the machine is, a time budget does) and tabulates the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEARN_RECIPE: dict[str, Any] = {
    "arch": "ssdlite320_mobilenet_v3_large",
    "weights_backbone": None,  # from scratch: the benchmark measures learning, and runs offline
    # SSDLite's own 320 px and anchor scales 0.2-0.95; flips only: IoU crops pay off over long schedules,
    # not in a few hundred steps (docs/training.md, ablation).
    "model": {"size": [320, 320]},
    "batch_size": 16,
    "lr": 0.05,
    "warmup_iters": 100,
    "schedule": "cosine",
    "weight_decay": 4e-5,
    "augment": "flip",
    "precision": "auto",
    "workers": 1,
    "epochs": 1000,  # bounded by the time budget or the step count
    "eval_every": 0,
    "checkpoint_every": 50,
}
# torchvision's SSDLite recipe (references/detection: SGD momentum 0.9, weight decay 4e-5 on every
# parameter, linear warm-up from 0.001, cosine decay) at batch 16, 100 warm-up steps, the cosine
# spanning the budget; horizontal flips only; bf16 autocast.
TORCHVISION_RECIPE: dict[str, Any] = {
    "arch": "ssdlite320_mobilenet_v3_large", "size": 320, "batch_size": 16, "lr": 0.05, "momentum": 0.9,
    "weight_decay": 4e-5, "warmup_iters": 100, "warmup_factor": 0.001, "hflip": 0.5, "autocast": "bf16",
}
TARGET_AP50 = 0.9  # 15 minutes on 2 cores, the synthetic set: AP50 the recipe must reach
MAX_PRECISION_GAP_POINTS = 0.5
TABLE_METRICS = ("AP", "AP50", "APs", "APm", "APl")

# `ssd bench learn --ablate` without variants: one change at a time against LEARN_RECIPE.
DEFAULT_ABLATIONS = (
    "base", "size=224", "augment=ssdlite", "augment=none", "batch_size=32,lr=0.1", "lr=0.075",
    "model.min_ratio=0.1,model.max_ratio=0.9", "grad_clip=none",
)


def parse_variant(spec: str) -> dict[str, Any]:
    """TrainConfig overrides from an ablation variant: "base" (none) or comma-separated key=value pairs
    with JSON values ("none" for None, bare words as strings); "size=N" sets the square input size and
    "model.KEY=V" a model option, e.g. "batch_size=32,lr=0.15" or "size=256,model.min_ratio=0.1"."""
    from ssd_core.train_config import TrainConfig

    overrides: dict[str, Any] = {}
    if spec.strip() == "base":
        return overrides
    known = set(TrainConfig.__dataclass_fields__)
    for item in spec.split(","):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"ablation variant {spec!r}: expected key=value pairs, got {item!r}")
        try:
            value = None if text.strip().lower() == "none" else json.loads(text)
        except json.JSONDecodeError:
            value = text.strip()
        if key == "size":
            overrides.setdefault("model", {})["size"] = [int(value), int(value)]
        elif key.startswith("model."):
            overrides.setdefault("model", {})[key[len("model."):]] = value
        elif key in known:
            overrides[key] = value
        else:
            raise ValueError(f"ablation variant {spec!r}: {key!r} is not a training option")
    return overrides


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


# -- the anchor: torchvision's model and recipe ------------------------------------------------------


def train_torchvision(
    data: str, *, minutes: float | None = None, steps: int | None = None, seed: int = 0, workers: int = 1,
    threads: int | None = None, eval_max_images: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Train torchvision's SSDLite from scratch with `TORCHVISION_RECIPE` on `data` for `minutes` of
    training time or `steps` steps (the cosine spans whichever is given) on `threads` torch threads
    (default: as set), then evaluate it (fp32, its own resize) on the val split. The train images are decoded once
    (ssd_core's decoder) before the clock starts."""
    import torch
    import torchvision
    from torchvision.transforms.v2 import functional as TF
    from torchvision.tv_tensors import BoundingBoxFormat
    from tqdm.auto import tqdm

    from ssd_core.data import CocoDataset, build_preset
    from ssd_core.engine import Stopwatch, lr_factor
    from ssd_core.evaluation import evaluate_model, scalar_metrics

    if (minutes is None) == (steps is None):
        raise ValueError("give the anchor either minutes or steps")
    recipe = TORCHVISION_RECIPE
    if threads:
        torch.set_num_threads(threads)
    train_set = CocoDataset(data, "train")
    images = [train_set.read_image(i) for i in range(len(train_set))]  # uint8 [3, H, W]
    annotations = [train_set.annotations(i) for i in range(len(train_set))]
    batch_size = recipe["batch_size"]
    if len(images) < batch_size:
        raise ValueError(f"{train_set.annotation_path}: {len(images)} training images make no batch of {batch_size}")

    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, recipe["arch"])(
        weights=None, weights_backbone=None, num_classes=train_set.num_classes)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=recipe["lr"],
                                momentum=recipe["momentum"], weight_decay=recipe["weight_decay"])
    stopwatch = Stopwatch()
    budget_s = None if minutes is None else 60.0 * minutes
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        total_steps=steps or 1, warmup_iters=recipe["warmup_iters"], warmup_factor=recipe["warmup_factor"],
        schedule="cosine", milestones=[], gamma=1.0,
        progress=None if budget_s is None else (lambda _step: stopwatch.elapsed() / budget_s),
    ))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    bar = tqdm(total=steps, desc="torchvision", unit="step", disable=not progress, mininterval=10.0)
    stopwatch.start()
    while True:
        order = torch.randperm(len(images), generator=generator).tolist()
        flips = (torch.rand(len(order), generator=generator) < recipe["hflip"]).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch, targets = [], []
            for index, flip in zip(order[start:start + batch_size], flips[start:start + batch_size]):
                image, (boxes, labels) = images[index], annotations[index]
                if flip:
                    image, boxes = TF.horizontal_flip_image(image), TF.horizontal_flip_bounding_boxes(
                        boxes, format=BoundingBoxFormat.XYXY, canvas_size=tuple(image.shape[-2:]))
                batch.append(image.float().div_(255))
                targets.append({"boxes": boxes, "labels": labels})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = model(batch, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"torchvision's loss is {loss.item()} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if (steps is not None and step >= steps) or (budget_s is not None and stopwatch.elapsed() >= budget_s):
                break
        else:
            continue
        break
    stopwatch.stop()
    bar.close()
    del images
    val_set = CocoDataset(data, "val", transforms=build_preset("none"))  # the model resizes itself
    metrics = evaluate_model(model, val_set, batch_size=16, workers=workers, progress=progress,
                             max_images=eval_max_images)
    return {
        "recipe": dict(recipe), "steps": step, "train_time_s": stopwatch.elapsed(),
        "train_images_per_s": step * batch_size / max(stopwatch.elapsed(), 1e-9),
        "metrics": scalar_metrics(metrics),
    }


# -- ours, side by side --------------------------------------------------------------------------------


def recipe_with(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` (default LEARN_RECIPE) updated with `overrides`; "model" options are merged."""
    base = LEARN_RECIPE if base is None else base
    recipe = {**base, **overrides}
    if "model" in overrides:
        recipe["model"] = {**base.get("model", {}), **overrides["model"]}
    return recipe


def learn(
    data: str, output: str, *, minutes: float = 15.0, steps: int | None = None, target_ap50: float = TARGET_AP50,
    compare: bool = True, anchor: bool = True, **overrides: Any,
) -> dict[str, Any]:
    """Train `LEARN_RECIPE` (updated with `overrides`, TrainConfig fields) from scratch on `data` for
    `minutes` of training time, or `steps` steps when given; then (with `anchor`) torchvision's model
    with `TORCHVISION_RECIPE` on the same data, budget and threads. Returns and writes
    RUN_DIR/learn.json: the final metrics, whether AP50 reached `target_ap50`, the anchor's run and the
    difference, and (with `compare`) the fp32-vs-bf16 evaluation gap of our checkpoint."""
    from ssd_core.engine import fit
    from ssd_core.storage import atomic_write_bytes, join_uri
    from ssd_core.train_config import TrainConfig

    if steps is None and not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    budget = {"train_steps": steps} if steps is not None else {"time_budget_s": 60.0 * minutes}
    config = TrainConfig.from_dict({**recipe_with(overrides), "data": data, "output": output, **budget})
    result = fit(config)
    report: dict[str, Any] = {
        "recipe": config.to_dict(),
        "minutes": None if steps is not None else minutes,
        "train_time_s": result["train_time_s"],
        "steps": result["step"],
        "epochs_done": result["epoch"],
        "metrics": {k: result.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")},
        "target_AP50": target_ap50,
        "reached_target": (result.get("AP50") or 0.0) >= target_ap50,
        "checkpoint": result["checkpoint"],
        "train_images_per_s": result["step"] * config.batch_size / max(result["train_time_s"], 1e-9),
        "loader_images_per_s": result.get("loader_images_per_s"),
    }
    if anchor:
        reference = train_torchvision(
            data, minutes=None if steps is not None else minutes, steps=steps, seed=config.seed,
            workers=config.workers, threads=config.threads, eval_max_images=config.eval_max_images, progress=config.progress)
        report["torchvision"] = reference
        report["difference"] = difference(report, reference)
    if compare:
        comparison = compare_precisions(result["checkpoint"], data, workers=config.workers)
        report["precision_comparison"] = comparison
        report["precision_gap_ok"] = max(comparison["gap_points"].values()) <= MAX_PRECISION_GAP_POINTS
    atomic_write_bytes(join_uri(output, "learn.json"), (json.dumps(report, indent=2) + "\n").encode())
    return report


def _row(run: dict[str, Any]) -> dict[str, float | None]:
    return {"steps": run["steps"], "images/s": run["train_images_per_s"], **{k: run["metrics"].get(k) for k in TABLE_METRICS}}


def difference(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """ours - torchvision for every column of the side-by-side table (None where either is undefined)."""
    a, b = _row(ours), _row(reference)
    return {k: None if a[k] is None or b[k] is None else a[k] - b[k] for k in a}


def side_by_side(report: dict[str, Any]) -> str:
    """The table `ssd bench learn` prints: ours, torchvision's (if run) and the difference."""
    rows = [("ssd_core", _row(report))]
    if "torchvision" in report:
        rows += [("torchvision", _row(report["torchvision"])), ("difference", report["difference"])]
    columns = list(rows[0][1])

    def cell(name: str, key: str, value: float | None) -> str:
        if value is None:
            return "-"
        sign = "+" if name == "difference" and value > 0 else ""
        return f"{sign}{value:.0f}" if key == "steps" else f"{sign}{value:.1f}" if key == "images/s" else f"{sign}{value:.3f}"

    lines = [f"{'':<12}" + "".join(f"{c:>10}" for c in columns)]
    lines += [f"{name:<12}" + "".join(f"{cell(name, c, row[c]):>10}" for c in columns) for name, row in rows]
    return "\n".join(lines)


# -- ablation ------------------------------------------------------------------------------------------


def ablate(
    datasets: list[str], output: str, *, steps: int, variants: list[str] | None = None, anchor: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train each of `variants` (`parse_variant` specs; default DEFAULT_ABLATIONS) for `steps` steps on
    each dataset, each from LEARN_RECIPE updated with `overrides` then the variant's change (and, with
    `anchor`, torchvision's recipe on each dataset). Runs go to OUTPUT/<variant>/<dataset folder name>; a
    run whose learn.json exists is read back instead of trained again. Returns one row per variant: mean
    and per-dataset metrics. AP at a fixed step count is what a variant learns per update; images/s
    (under whatever else runs on the machine) says what an update costs."""
    variants = list(DEFAULT_ABLATIONS if variants is None else variants)
    changes = {variant: parse_variant(variant) for variant in variants}  # bad specs fail before any training
    base = recipe_with(overrides)
    progress = base.get("progress", True)
    names = [Path(d.rstrip("/")).name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folders need distinct names, got {names}")
    rows = []
    for variant in [*variants, *(["torchvision"] if anchor else [])]:
        runs = []
        for data, name in zip(datasets, names):
            run_dir = Path(output) / _slug(variant) / name
            done = run_dir / "learn.json"
            if done.exists():
                runs.append(json.loads(done.read_text()))
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            if variant == "torchvision":
                run = train_torchvision(data, steps=steps, seed=base.get("seed", 0), workers=base["workers"],
                                        threads=base.get("threads"), eval_max_images=base.get("eval_max_images"),
                                        progress=progress)
                done.write_text(json.dumps(run, indent=2) + "\n")
            else:
                recipe = {**recipe_with(changes[variant], base), "overwrite": True}
                run = learn(data, str(run_dir), steps=steps, compare=False, anchor=False, **recipe)
            runs.append(run)
            log.info("ablation %s on %s: AP %.3f", variant, name, run["metrics"]["AP"] or 0.0)
        rows.append(_ablation_row(variant, runs, names))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _ablation_row(variant: str, runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    row: dict[str, Any] = {"variant": variant, "steps": runs[0]["steps"]}
    for key in ("AP", "AP50", "APs"):
        row[key] = mean([run["metrics"].get(key) for run in runs])
    row["AP per dataset"] = [run["metrics"].get("AP") for run in runs]
    row["images/s"] = mean([run["train_images_per_s"] for run in runs])
    row["datasets"] = names
    return row


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `ablate`'s rows (means over the datasets; AP per dataset in brackets)."""
    lines = ["| variant | steps | AP | AP50 | APs | AP per dataset | images/s |", "|---|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        def f(value: float | None) -> str:
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

        per = " / ".join(f(v) for v in row["AP per dataset"])
        lines.append(f"| {row['variant']} | {row['steps']} | {f(row['AP'])} | {f(row['AP50'])} | {f(row['APs'])} | "
                     f"{per} | {row['images/s']:.1f} |")
    return "\n".join(lines)
