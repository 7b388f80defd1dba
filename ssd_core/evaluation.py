"""COCO evaluation: a thin wrapper over pycocotools, model evaluation over a dataset, and reports.

Metric names follow pycocotools' ``COCOeval.stats`` order (all on a 0-1 scale)::

    AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl

pycocotools reports -1 for a metric with no ground truth to measure (e.g. ``APs`` when the ground
truth has no small objects); such metrics are ``None`` here (``null`` in JSON), never -1 or NaN.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from pycocotools.coco import COCO

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_DESCRIPTIONS = {
    "AP": "AP @ IoU 0.50:0.95, all areas, 100 dets",
    "AP50": "AP @ IoU 0.50",
    "AP75": "AP @ IoU 0.75",
    "APs": "AP small (area < 32^2)",
    "APm": "AP medium (32^2 .. 96^2)",
    "APl": "AP large (area > 96^2)",
    "AR1": "AR, 1 det per image",
    "AR10": "AR, 10 dets per image",
    "AR100": "AR, 100 dets per image",
    "ARs": "AR small",
    "ARm": "AR medium",
    "ARl": "AR large",
}
# IoU thresholds the precision-recall curves are kept for (plots, per-class AP50).
PR_IOUS = (0.5, 0.75)


# --------------------------------------------------------------------------- loading


def _quiet():
    """pycocotools prints progress on stdout; keep it out of our CLI output and training logs."""
    return contextlib.redirect_stdout(io.StringIO())


def _read_json(path: str | Path) -> Any:
    from ssd_core.storage import open_uri

    try:
        with open_uri(str(path), "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def load_coco(gt: str | Path | COCO) -> COCO:
    """A pycocotools ``COCO`` for a ground-truth annotation file (local or s3://) or the object itself."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    dataset = _read_json(gt)
    if not isinstance(dataset, dict) or "images" not in dataset or "annotations" not in dataset:
        raise ValueError(f"{gt}: not a COCO annotation file (needs 'images', 'annotations', 'categories')")
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def load_results(results: str | Path | Sequence[dict]) -> list[dict]:
    """COCO detection results (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``)
    from a JSON file or an in-memory list (copied, because pycocotools adds keys to each dict)."""
    loaded = _read_json(results) if isinstance(results, str | Path) else results
    if not isinstance(loaded, list):
        raise ValueError(f"{results if isinstance(results, str | Path) else 'results'}: "
                         "COCO results must be a JSON list of detections")
    return [dict(det) for det in loaded]


def _check_results(coco_gt: COCO, results: list[dict], source: str) -> None:
    """Fail with a message naming the bad ids instead of pycocotools' bare assertion."""
    missing = [key for key in ("image_id", "category_id", "bbox", "score") if results and key not in results[0]]
    if missing:
        raise ValueError(f"{source}: detections need keys image_id, category_id, bbox, score; missing {missing}")
    unknown_images = {det["image_id"] for det in results} - set(coco_gt.imgs)
    if unknown_images:
        raise ValueError(f"{source}: image_id not in the ground truth: {sorted(unknown_images)[:10]}")
    unknown_cats = {det["category_id"] for det in results} - set(coco_gt.cats)
    if unknown_cats:
        raise ValueError(f"{source}: category_id not in the ground truth: {sorted(unknown_cats)[:10]}")


def _load_detections(coco_gt: COCO, results: list[dict]) -> COCO:
    """The results as a COCO object; an empty list (loadRes cannot take one) gives one with no detections."""
    from pycocotools.coco import COCO

    if results:
        with _quiet():
            return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
    with _quiet():
        coco_dt.createIndex()
    return coco_dt


# --------------------------------------------------------------------------- metrics


def _metric_value(value: float) -> float | None:
    """pycocotools' -1 (nothing to measure) and NaN become None; everything else a plain float."""
    value = float(value)
    return None if value < 0 or math.isnan(value) else value


def _mean_defined(precision: np.ndarray) -> float | None:
    """Mean over entries pycocotools marks as defined (> -1), as COCOeval.summarize does."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else None


def coco_metrics(gt: str | Path | COCO, results: str | Path | Sequence[dict], *,
                 image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Score COCO-format detections against ground truth with pycocotools (bbox).

    ``gt``: annotation file or ``COCO``; ``results``: results JSON file or list of detection dicts;
    ``image_ids``: score only these images (default: all images of the ground truth).
    Returns the 12 metrics of ``METRIC_NAMES`` (float in 0..1 or None), ``per_class_AP`` and
    ``per_class_AP50`` ({category name: float | None}), ``pr_curves`` (see ``_pr_curves``),
    ``num_images``, ``image_ids`` (those scored) and ``num_detections``.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = load_coco(gt)
    detections = load_results(results)
    _check_results(coco_gt, detections, str(results) if isinstance(results, str | Path) else "results")
    coco_dt = _load_detections(coco_gt, detections)

    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        if not len(image_ids):
            raise ValueError("no images to evaluate")  # pycocotools would silently take all of them
        evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    metrics: dict[str, Any] = {name: _metric_value(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    # precision: [T iou thresholds, R recall points, K categories, A areas, M max dets]; area "all", 100 dets.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    names = [coco_gt.cats[cat_id]["name"] for cat_id in evaluator.params.catIds]
    iou_50 = _iou_index(evaluator.params.iouThrs, 0.5)
    metrics["per_class_AP"] = {name: _mean_defined(precision[:, :, k]) for k, name in enumerate(names)}
    metrics["per_class_AP50"] = {name: _mean_defined(precision[iou_50, :, k]) for k, name in enumerate(names)}
    metrics["pr_curves"] = _pr_curves(precision, evaluator.params, names)
    metrics["num_images"] = len(evaluator.params.imgIds)
    metrics["image_ids"] = [int(i) for i in evaluator.params.imgIds]
    metrics["num_detections"] = len(detections)
    return metrics


def _iou_index(iou_thresholds: np.ndarray, iou: float) -> int:
    return int(abs(iou_thresholds - iou).argmin())


def _pr_curves(precision: np.ndarray, params: Any, names: list[str]) -> dict[str, Any]:
    """Interpolated precision at pycocotools' 101 recall points, for IoU 0.5 and 0.75.

    ``{"recall": [101], "precision": {"0.50": {"all": [101] | None, class name: [101] | None}, ...}}``;
    "all" is the mean over classes with ground truth; a class without ground truth is None.
    """
    curves: dict[str, Any] = {"recall": params.recThrs.tolist(), "precision": {}}
    for iou in PR_IOUS:
        at_iou = precision[_iou_index(params.iouThrs, iou)]  # [R, K]
        has_gt = (at_iou > -1).all(axis=0)  # [K]
        per_class = {name: (at_iou[:, k].tolist() if has_gt[k] else None) for k, name in enumerate(names)}
        overall = at_iou[:, has_gt].mean(axis=1).tolist() if has_gt.any() else None
        curves["precision"][f"{iou:.2f}"] = {"all": overall, **per_class}
    return curves


def confusion_matrix(gt: str | Path | COCO, results: str | Path | Sequence[dict], *, iou_threshold: float = 0.5,
                     score_threshold: float = 0.25, image_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Detection confusion matrix: which class each ground-truth box was detected as.

    Per image, detections scoring at least ``score_threshold`` are matched one to one with the (non-crowd)
    ground-truth boxes they overlap by IoU >= ``iou_threshold``, highest IoU first, whatever the classes.
    ``matrix[i][j]`` counts ground truth of class i matched to a detection of class j; the last row and
    column are background: row = detections matching no ground truth (false positives), column = ground
    truth no detection matched (missed). Crowd regions, detections inside them and images outside
    ``image_ids`` are left out.
    Returns {"classes": [K names..., "background"], "matrix": [K + 1][K + 1] ints, "iou_threshold",
    "score_threshold", "per_class": {name: {ground_truth, detections, true_positives, precision, recall}}}.
    """
    import numpy as np
    import torch
    from torchvision.ops import box_area, box_convert, box_iou

    coco_gt = load_coco(gt)
    category_ids = sorted(coco_gt.cats)
    index_of = {category_id: index for index, category_id in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    detections: dict[int, list[dict]] = {}
    for det in load_results(results):
        if det["score"] >= score_threshold:
            detections.setdefault(det["image_id"], []).append(det)
    wanted = set(coco_gt.imgs) if image_ids is None else {int(i) for i in image_ids}

    def boxes_of(records: list[dict]) -> torch.Tensor:
        xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float64).reshape(-1, 4)
        return box_convert(xywh, "xywh", "xyxy")

    for image_id in sorted(wanted):
        annotations = coco_gt.imgToAnns.get(image_id, [])
        truth = [a for a in annotations if not a.get("iscrowd", 0)]
        crowd = boxes_of([a for a in annotations if a.get("iscrowd", 0)])
        found = detections.get(image_id, [])
        truth_classes = [index_of[a["category_id"]] for a in truth]
        found_classes = [index_of[d["category_id"]] for d in found]
        iou = box_iou(boxes_of(truth), boxes_of(found))  # [G, D]
        matched_truth, matched_found = set(), set()
        pairs = (iou >= iou_threshold).nonzero().tolist()
        for g, d in sorted(pairs, key=lambda pair: -iou[pair[0], pair[1]].item()):
            if g not in matched_truth and d not in matched_found:
                matched_truth.add(g)
                matched_found.add(d)
                matrix[truth_classes[g], found_classes[d]] += 1
        for g, klass in enumerate(truth_classes):
            if g not in matched_truth:
                matrix[klass, background] += 1
        # As in COCOeval, an unmatched detection lying inside a crowd region (intersection over the
        # detection's area >= the threshold) is ignored rather than counted as a false positive.
        found_boxes = boxes_of(found)
        corners_low = torch.maximum(found_boxes[:, None, :2], crowd[None, :, :2])
        corners_high = torch.minimum(found_boxes[:, None, 2:], crowd[None, :, 2:])
        inter = (corners_high - corners_low).clamp(min=0).prod(dim=2)  # [D, C]
        in_crowd = (inter / box_area(found_boxes).clamp(min=1e-9)[:, None] >= iou_threshold).any(dim=1)
        for d, klass in enumerate(found_classes):
            if d not in matched_found and not in_crowd[d]:
                matrix[background, klass] += 1

    names = [coco_gt.cats[category_id]["name"] for category_id in category_ids]
    per_class = {}
    for k, name in enumerate(names):
        truth_count, found_count, hits = int(matrix[k].sum()), int(matrix[:, k].sum()), int(matrix[k, k])
        per_class[name] = {"ground_truth": truth_count, "detections": found_count, "true_positives": hits,
                           "precision": hits / found_count if found_count else None,
                           "recall": hits / truth_count if truth_count else None}
    return {"classes": [*names, "background"], "matrix": matrix.tolist(), "iou_threshold": iou_threshold,
            "score_threshold": score_threshold, "per_class": per_class}


def plot_confusion(confusion: dict[str, Any], out_png: str | Path) -> Path:
    """The confusion matrix as a heat map (colour: share of the row, i.e. of that class's ground truth;
    numbers: counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion["matrix"], dtype=np.int64)
    names = confusion["classes"]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(5.0, 0.55 * len(names) + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 40:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="detected as", ylabel="ground truth",
           title=f"Confusion matrix (IoU >= {confusion['iou_threshold']}, score >= {confusion['score_threshold']})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth row")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Just the 12 COCO numbers (what a training log line needs)."""
    return {name: metrics.get(name) for name in METRIC_NAMES}


def format_summary(metrics: dict[str, Any]) -> str:
    """The 12 metrics as a table like pycocotools' summary, one metric per line."""
    lines = []
    for name in METRIC_NAMES:
        value = metrics.get(name)
        shown = "   n/a" if value is None else f"{value:6.3f}"
        lines.append(f"{name:>6}  {shown}   {METRIC_DESCRIPTIONS[name]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- model evaluation


def model_label_to_category_id(model_class_names: Sequence[str] | None, dataset: Any) -> list[int]:
    """The dataset category id of each model label (index = model label), -1 for labels to drop.

    A model trained on this dataset has the same class names and maps one to one. A model trained
    elsewhere (e.g. torchvision's 91-label COCO numbering) is matched by class name. With no shared
    names and the same number of classes the mapping is by position (e.g. random-weight models).
    """
    dataset_names = list(dataset.class_names)
    by_position = [-1, *list(dataset.label_to_category_id)[1:]]
    if model_class_names is None or list(model_class_names) == dataset_names:
        return by_position
    name_to_category = dict(zip(dataset_names[1:], by_position[1:]))
    by_name = [-1] + [name_to_category.get(name, -1) for name in list(model_class_names)[1:]]
    if any(cat >= 0 for cat in by_name):
        return by_name
    if len(model_class_names) != len(dataset_names):
        raise ValueError(
            f"model classes ({len(model_class_names) - 1}: {list(model_class_names)[1:4]}...) share no names "
            f"with the dataset's ({len(dataset_names) - 1}: {dataset_names[1:4]}...)"
        )
    log.warning("model class names differ from the dataset's; mapping labels by position")
    return by_position


def _model_device(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def predict_dataset(model: Any, dataset: Any, *, batch_size: int = 8, workers: int = 2, progress: bool = True,
                    max_images: int | None = None) -> tuple[list[dict], list[int]]:
    """Run ``model`` (eval mode, inference mode) over ``dataset``; returns (COCO results, image ids seen).

    Boxes are mapped back to the image file's pixels when the dataset's transforms resized images
    (``target["orig_size"]``), and labels to the dataset's category ids.
    """
    import torch
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    from ssd_core.data import detections_to_coco_results, make_loader
    from ssd_core.inference import optimize_for_inference

    label_map = model_label_to_category_id(getattr(model, "class_names", None), dataset)
    subset = dataset if max_images is None else Subset(dataset, range(min(max_images, len(dataset))))
    loader = make_loader(_SkipUnreadable(subset), batch_size, shuffle=False, workers=workers, seed=0)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    runner = optimize_for_inference(model) if hasattr(model, "precision") else model
    results: list[dict] = []
    image_ids: list[int] = []
    try:
        with torch.inference_mode():
            for batch_images, batch_targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                images, targets = [], []
                for image, target in zip(batch_images, batch_targets):
                    if image is None:  # left out of the scored images (COCOeval sees only those read)
                        log.warning("evaluation skips an unreadable image: %s", target["unreadable"])
                        continue
                    images.append(image)
                    targets.append(target)
                if not images:
                    continue
                outputs = runner([image.to(device, non_blocking=True) for image in images])
                outputs = [_to_file_pixels(out, image, target) for out, image, target in zip(outputs, images, targets)]
                batch_ids = [int(target["image_id"]) for target in targets]
                results.extend(det for det in detections_to_coco_results(outputs, batch_ids, label_map)
                               if det["category_id"] >= 0)  # -1: a model class the dataset lacks
                image_ids.extend(batch_ids)
    finally:
        model.train(was_training)
    return results, image_ids


class _SkipUnreadable:
    """`dataset[i]`, or (None, {"unreadable": reason}) for an image that is missing or cannot be decoded,
    so one bad file does not end an evaluation (or the training run evaluating)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        from ssd_core.data.coco import UnreadableImageError

        try:
            return self.dataset[index]
        except UnreadableImageError as exc:
            return None, {"unreadable": str(exc)}


def _to_file_pixels(output: dict[str, torch.Tensor], image: torch.Tensor, target: dict) -> dict[str, torch.Tensor]:
    """Scale boxes from the (possibly resized) dataset image to the original file's pixels."""
    import torch

    orig_size = target.get("orig_size")
    height, width = image.shape[-2:]
    if orig_size is None or (int(orig_size[0]), int(orig_size[1])) == (height, width):
        return output
    scale = torch.tensor([orig_size[1] / width, orig_size[0] / height] * 2)
    return {**output, "boxes": output["boxes"].float().cpu() * scale}


def evaluate_model(model: Any, dataset: Any, *, batch_size: int = 8, workers: int = 2, progress: bool = True,
                   max_images: int | None = None) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` (a ``ssd_core.data.CocoDataset``).

    ``max_images``: evaluate only the first N images (scored against those images only).
    Returns ``coco_metrics``' dict plus ``"results"``: the COCO results list.
    """
    results, image_ids = predict_dataset(model, dataset, batch_size=batch_size, workers=workers,
                                         progress=progress, max_images=max_images)
    metrics = coco_metrics(dataset.coco, results, image_ids=image_ids)
    metrics["results"] = results
    return metrics


# --------------------------------------------------------------------------- report


def write_report(metrics: dict[str, Any], output_dir: str | Path, *, results: Sequence[dict] | None = None,
                 dataset: Any = None, model: Any = None, sample_images: int = 8, show_gt: bool = False,
                 gt: str | Path | COCO | None = None, images_dir: str | Path | None = None,
                 confusion_score: float = 0.25, confusion_iou: float = 0.5) -> Path | str:
    """Write an evaluation report into ``output_dir``, a folder or an s3:// prefix (the files are rendered
    in a temporary folder, then uploaded); returns the location of ``report.md`` (a Path, or the URI).

    Files: ``metrics.json`` (the 12 metrics, per-class AP/AP50, counts, the confusion matrix),
    ``results.json`` (COCO results), ``pr_curves.png``, ``confusion.png`` (detections scoring at least
    ``confusion_score`` matched at IoU ``confusion_iou``, see ``confusion_matrix``), ``report.md`` and,
    when images are at hand, ``samples.png``.
    Sample images come from ``dataset`` or from ``images_dir`` (file names from ``gt``); their
    detections from ``results`` (default ``metrics["results"]``), or from ``model`` when no results
    are given.
    """
    from ssd_core import storage

    if storage.is_s3(str(output_dir)):
        with tempfile.TemporaryDirectory(prefix="ssd-report-") as local:
            report = write_report(metrics, local, results=results, dataset=dataset, model=model,
                                  sample_images=sample_images, show_gt=show_gt, gt=gt, images_dir=images_dir,
                                  confusion_score=confusion_score, confusion_iou=confusion_iou)
            storage.upload_files(local, sorted(p.name for p in Path(local).iterdir() if p.is_file()), output_dir)
        return storage.join_uri(output_dir, report.name)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(results if results is not None else metrics.get("results") or [])

    coco_gt = load_coco(gt) if gt is not None else (dataset.coco if dataset is not None else None)
    if coco_gt is not None and "confusion" not in metrics:
        metrics = {**metrics, "confusion": confusion_matrix(coco_gt, results, image_ids=metrics.get("image_ids"),
                                                            iou_threshold=confusion_iou,
                                                            score_threshold=confusion_score)}
    saved = {name: metrics.get(name) for name in METRIC_NAMES}
    for key in ("per_class_AP", "per_class_AP50", "num_images", "num_detections", "confusion"):
        if key in metrics:
            saved[key] = metrics[key]
    (out / "metrics.json").write_text(json.dumps(saved, indent=2))
    (out / "results.json").write_text(json.dumps(results))

    pictures = []
    if metrics.get("pr_curves"):
        plot_pr_curves(metrics["pr_curves"], out / "pr_curves.png", per_class_ap=metrics.get("per_class_AP"))
        pictures.append(("Precision-recall curves", "pr_curves.png"))
    if metrics.get("confusion"):
        plot_confusion(metrics["confusion"], out / "confusion.png")
        pictures.append(("Confusion matrix", "confusion.png"))
    if sample_images > 0 and coco_gt is not None and (dataset is not None or images_dir is not None):
        if not results and model is not None and dataset is not None:
            results, _ = predict_dataset(model, dataset, batch_size=1, workers=0, progress=False,
                                         max_images=sample_images)
        samples = render_samples(coco_gt, results, dataset=dataset, images_dir=images_dir,
                                 count=sample_images, show_gt=show_gt)
        if samples is not None:
            samples.save(out / "samples.png")
            pictures.append(("Sample detections" + (" (ground truth left)" if show_gt else ""), "samples.png"))

    report = out / "report.md"
    report.write_text(_report_markdown(metrics, pictures))
    return report


def _report_markdown(metrics: dict[str, Any], pictures: list[tuple[str, str]]) -> str:
    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["# Evaluation report", ""]
    if "num_images" in metrics:
        lines += [f"{metrics['num_images']} images, {metrics.get('num_detections', 0)} detections.", ""]
    lines += ["## COCO metrics (bbox)", "", "| metric | value | meaning |", "|---|---:|---|"]
    lines += [f"| {name} | {shown(metrics.get(name))} | {METRIC_DESCRIPTIONS[name]} |" for name in METRIC_NAMES]
    per_class = metrics.get("per_class_AP") or {}
    per_class_50 = metrics.get("per_class_AP50") or {}
    confusion = metrics.get("confusion")
    counts = confusion["per_class"] if confusion else {}
    if per_class:
        lines += ["", "## Per class", ""]
        if confusion:
            lines += [f"Counts, precision and recall at IoU >= {confusion['iou_threshold']} and score >= "
                      f"{confusion['score_threshold']} (the confusion matrix's matching); AP over all scores.", "",
                      "| class | AP | AP50 | ground truth | detections | correct | precision | recall |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name, ap in per_class.items():
                c = counts.get(name, {})
                lines.append(f"| {name} | {shown(ap)} | {shown(per_class_50.get(name))} | {c.get('ground_truth', 0)} "
                             f"| {c.get('detections', 0)} | {c.get('true_positives', 0)} | {shown(c.get('precision'))} "
                             f"| {shown(c.get('recall'))} |")
        else:
            lines += ["| class | AP | AP50 |", "|---|---:|---:|"]
            lines += [f"| {name} | {shown(ap)} | {shown(per_class_50.get(name))} |" for name, ap in per_class.items()]
        lines += ["", "n/a: the class has no ground truth (or, for precision, no detections) in the evaluated images."]
    if pictures:
        lines += ["", "## Pictures", ""]
        lines += [f"### {title}\n\n![{title}]({file})\n" for title, file in pictures]
    lines += ["", "Detections: [results.json](results.json); numbers: [metrics.json](metrics.json).", ""]
    return "\n".join(lines)


def plot_pr_curves(pr_curves: dict[str, Any], out_png: str | Path, *,
                   per_class_ap: dict[str, float | None] | None = None, max_legend_classes: int = 12) -> Path:
    """Precision-recall curves (one panel per IoU threshold): every class thin, the class mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = pr_curves["recall"]
    panels = pr_curves["precision"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6.5), squeeze=False)
    for ax, (iou, curves) in zip(axes[0], panels.items()):
        classes = {name: curve for name, curve in curves.items() if name != "all" and curve is not None}
        labelled = len(classes) <= max_legend_classes
        colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
        for i, (name, curve) in enumerate(classes.items()):
            ap = sum(curve) / len(curve)
            ax.plot(recall, curve, lw=1.2, alpha=0.8, color=colours(i % colours.N),
                    label=f"{name} ({ap:.2f})" if labelled else None)
        if curves.get("all") is not None:
            mean_ap = sum(curves["all"]) / len(curves["all"])
            ax.plot(recall, curves["all"], lw=3, color="black", label=f"mean over classes ({mean_ap:.3f})")
        ax.set(title=f"IoU {iou}" + ("" if labelled else f" ({len(classes)} classes, thin lines)"),
               xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Below the axes: inside, a legend hides the low-recall end of the curves.
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3,
                      title="class (AP at this IoU)", title_fontsize=8, frameon=False)
    fig.suptitle("Precision-recall (area all, 100 detections per image)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def render_samples(coco_gt: COCO, results: Sequence[dict], *, dataset: Any = None,
                   images_dir: str | Path | None = None, count: int = 8, show_gt: bool = False,
                   score_threshold: float = 0.3, max_side: int = 480):
    """A grid image of detections drawn on the first ``count`` images (PIL.Image, or None if none).

    Images come from ``dataset`` (by COCO image id) or from ``images_dir`` / the ground truth's file
    names; boxes from ``results`` in the file's pixels, rescaled to the drawn image.
    """
    import torch

    from ssd_core.visualize import draw_detections, draw_ground_truth_beside, make_grid_image

    category_ids = sorted(coco_gt.cats)
    class_names = ["__background__"] + [coco_gt.cats[c]["name"] for c in category_ids]
    category_to_label = {cat: label for label, cat in enumerate(category_ids, start=1)}
    image_ids = list(dataset.image_ids) if dataset is not None else sorted(coco_gt.imgs)
    by_image: dict[int, list[dict]] = {}
    for det in results:
        by_image.setdefault(det["image_id"], []).append(det)

    def as_tensors(anns: list[dict], scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        scores = torch.tensor([float(a.get("score", 1.0)) for a in anns])
        return boxes * scale, labels, scores

    cells = []
    for index, image_id in enumerate(image_ids[:count]):
        try:
            image = _load_sample_image(coco_gt, image_id, index, dataset, images_dir)
        except (FileNotFoundError, ValueError) as exc:  # ValueError: UnreadableImageError, ImageDecodeError
            log.warning("samples.png leaves out an unreadable image: %s", exc)
            continue
        info = coco_gt.imgs[image_id]
        image.thumbnail((max_side, max_side))
        scale = torch.tensor([image.width / info["width"], image.height / info["height"]] * 2)
        pred = as_tensors(by_image.get(image_id, []), scale)
        if show_gt:
            truth = as_tensors(coco_gt.imgToAnns.get(image_id, []), scale)
            cells.append(draw_ground_truth_beside(image, truth[0], truth[1], *pred, class_names,
                                                  score_threshold=score_threshold))
        else:
            cells.append(draw_detections(image, *pred, class_names, score_threshold=score_threshold))
    return make_grid_image(cells) if cells else None


def _load_sample_image(coco_gt: COCO, image_id: int, index: int, dataset: Any, images_dir: str | Path | None):
    """The image as PIL RGB: from the dataset (without re-reading files) or from ``images_dir``, decoded
    as everywhere else (``ssd_core.images.decode_image``)."""
    from PIL import Image

    from ssd_core.images import decode_image
    from ssd_core.storage import join_uri, read_bytes

    if dataset is not None:
        from ssd_core.visualize import to_pil

        # The file's pixels (no transforms) when the dataset can give them, so boxes need no rescaling.
        read_image = getattr(dataset, "read_image", None)
        return to_pil(read_image(index) if read_image is not None else dataset[index][0])
    path = join_uri(str(images_dir), coco_gt.imgs[image_id]["file_name"])
    try:
        return Image.fromarray(decode_image(read_bytes(path)))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
