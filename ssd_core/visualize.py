"""Pictures: detections drawn on images, image grids, training curves.

Boxes are drawn with PIL rather than ``torchvision.utils.draw_bounding_boxes`` because the latter
cannot size its text without a TrueType file on disk and puts labels inside the box, over the object;
here labels sit above the box on a filled background in a contrasting text colour, and every box has
a thin dark halo so it stays visible on light and dark backgrounds alike.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image, ImageFont

# Distinct saturated colours (Tableau 10 + Kelly's extras), indexed by class label.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32),
    (206, 162, 98), (0, 125, 52), (246, 118, 142), (0, 83, 138), (83, 55, 122),
)


def class_colour(label: int) -> tuple[int, int, int]:
    """The fixed colour of a class label (same class, same colour, in every picture)."""
    return PALETTE[int(label) % len(PALETTE)]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (relative luminance)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no file on disk needed


def to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    """Tensor[3, H, W] (float 0..1 or uint8) or a PIL image -> a new RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")  # always a copy: we draw on it
    import torch
    from torchvision.transforms.v2.functional import to_pil_image

    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return to_pil_image(image).convert("RGB")


def _style(width: int, height: int) -> tuple[int, int]:
    """(line width, font size) scaled to the image so boxes and text read the same at any resolution."""
    side = max(width, height)
    return max(2, round(side / 250)), max(13, round(side / 36))


def draw_detections(image: torch.Tensor | Image.Image, boxes: torch.Tensor | Sequence, labels: torch.Tensor | Sequence,
                    scores: torch.Tensor | Sequence | None, class_names: Sequence[str], *,
                    score_threshold: float = 0.3) -> Image.Image:
    """Draw boxes with "class score" labels on a copy of ``image``.

    ``boxes``: [N, 4] xyxy in the image's pixels; ``labels``: [N] indices into ``class_names``;
    ``scores``: [N] or None (ground truth: no scores, nothing filtered). Boxes scoring below
    ``score_threshold`` are not drawn; higher scores are drawn last (on top).
    """
    from PIL import ImageDraw

    canvas = to_pil(image)
    draw = ImageDraw.Draw(canvas)
    line_width, font_size = _style(canvas.width, canvas.height)
    font = _font(font_size)

    box_list = _as_list(boxes)
    label_list = [int(x) for x in _as_list(labels)]
    score_list = [float(x) for x in _as_list(scores)] if scores is not None else [None] * len(box_list)
    order = sorted(
        (i for i, s in enumerate(score_list) if s is None or s >= score_threshold),
        key=lambda i: score_list[i] if score_list[i] is not None else 0.0,
    )
    drawn = []
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in box_list[i])
        colour = class_colour(label_list[i])
        # Dark halo one pixel either side of the coloured line keeps the box visible on any background.
        draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=line_width + 2)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        drawn.append((i, x1, y1, colour))
    for i, x1, y1, colour in drawn:  # labels after all boxes, so no box line crosses a label
        label = label_list[i]
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        text = name if score_list[i] is None else f"{name} {score_list[i]:.2f}"
        _draw_label(draw, text, (x1, y1), colour, font, canvas.size, line_width)
    return canvas


def _draw_label(draw: Any, text: str, corner: tuple[float, float], colour: tuple[int, int, int], font: Any,
                image_size: tuple[int, int], line_width: int) -> None:
    """Text on a filled box sized to the text: above the box's top-left corner, inside if no room."""
    pad = max(1, line_width)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left, bottom - top
    box_w, box_h = text_w + 2 * pad, text_h + 2 * pad
    x = min(max(corner[0] - 1, 0), max(image_size[0] - box_w, 0))
    y = corner[1] - 1 - box_h if corner[1] - 1 - box_h >= 0 else max(corner[1], 0)
    draw.rectangle((x, y, x + box_w, y + box_h), fill=colour, outline=(0, 0, 0), width=1)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(colour), font=font)


def _as_list(values: Any) -> list:
    if values is None:
        return []
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _titled(image: Image.Image, title: str) -> Image.Image:
    """``image`` with a white strip above holding ``title``."""
    from PIL import Image, ImageDraw

    font = _font(max(12, round(max(image.size) / 35)))
    strip = round(font.size * 1.6) if hasattr(font, "size") else 20
    out = Image.new("RGB", (image.width, image.height + strip), (255, 255, 255))
    out.paste(image, (0, strip))
    draw = ImageDraw.Draw(out)
    draw.text((6, strip // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    return out


def draw_ground_truth_beside(image: torch.Tensor | Image.Image, gt_boxes: Any, gt_labels: Any, boxes: Any,
                             labels: Any, scores: Any, class_names: Sequence[str], *,
                             score_threshold: float = 0.3) -> Image.Image:
    """Two panels side by side: ground truth (left) and predictions (right), titled.

    Box and label contracts as in ``draw_detections``; ground truth has no scores.
    """
    from PIL import Image

    truth = _titled(draw_detections(image, gt_boxes, gt_labels, None, class_names), "ground truth")
    predicted = _titled(
        draw_detections(image, boxes, labels, scores, class_names, score_threshold=score_threshold),
        f"predictions (score >= {score_threshold:g})",
    )
    gap = max(4, truth.width // 100)
    out = Image.new("RGB", (truth.width + gap + predicted.width, max(truth.height, predicted.height)),
                    (255, 255, 255))
    out.paste(truth, (0, 0))
    out.paste(predicted, (truth.width + gap, 0))
    return out


def make_grid_image(images: Sequence[Image.Image], *, columns: int | None = None, padding: int = 6,
                    background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images row by row in cells the size of the largest one (default: a near-square grid)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid_image needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * padding, rows * cell_h + (rows + 1) * padding),
                     background)
    for i, im in enumerate(images):
        row, col = divmod(i, columns)
        x = padding + col * (cell_w + padding) + (cell_w - im.width) // 2
        y = padding + row * (cell_h + padding) + (cell_h - im.height) // 2
        grid.paste(im.convert("RGB"), (x, y))
    return grid


def read_metrics_jsonl(path: str | Path) -> list[dict]:
    """Records of a training run's ``metrics.jsonl``; blank or partly written lines are skipped."""
    from ssd_core.storage import open_uri

    records = []
    with open_uri(str(path), "rb") as f:
        for line in f.read().decode().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the trainer may be writing the last line right now
            if isinstance(record, dict):
                records.append(record)
    return records


def _series(records: Sequence[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    """(x, y) of records that have a finite number under ``key`` and ``x_key``."""
    xs, ys = [], []
    for record in records:
        x, y = record.get(x_key), record.get(key)
        if isinstance(x, int | float) and isinstance(y, int | float) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def plot_training_curves(metrics_jsonl_path: str | Path, out_png: str | Path) -> Path:
    """Losses, learning rate, throughput and COCO AP of a training run from its ``metrics.jsonl``.

    Train records: ``{"kind": "train", "step", "epoch", "loss", "bbox_regression", "classification",
    "lr", "images_per_s"}``; eval records: ``{"kind": "eval", "step", "epoch", "AP", "AP50", ...}``.
    Missing keys are tolerated (a panel without data says so). The x axis is the step when records
    have one, else the epoch.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics_jsonl(metrics_jsonl_path)
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    x_key = "step" if any("step" in r for r in records) else "epoch"

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0, 0], train, ("loss", "bbox_regression", "classification"), "loss"),
        (axes[0, 1], evals, ("AP", "AP50", "AP75", "APs", "APm", "APl"), "COCO AP (val)"),
        (axes[1, 0], train, ("lr",), "learning rate"),
        (axes[1, 1], train, ("images_per_s",), "throughput (images/s)"),
    ]
    for ax, rows, keys, title in panels:
        plotted = False
        for key in keys:
            xs, ys = _series(rows, key, x_key)
            if xs:
                marker = "o" if rows is evals or len(xs) < 30 else None
                ax.plot(xs, ys, marker=marker, ms=4, lw=1.5 if key in ("loss", "AP") else 1.0, label=key)
                plotted = True
        ax.set(title=title, xlabel=x_key)
        ax.grid(alpha=0.3)
        if plotted:
            if len(keys) > 1:
                ax.legend(fontsize=8)
            if title.startswith("COCO"):
                ax.set_ylim(0, 1)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(f"Training curves: {Path(str(metrics_jsonl_path)).parent.name or metrics_jsonl_path}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
