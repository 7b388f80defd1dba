"""A deterministic, learnable COCO-format dataset of coloured shapes on textured backgrounds.

Each image holds 0-6 filled shapes (six classes, distinct colours with slight jitter) at COCO small,
medium and large scales. Shapes drawn later occlude earlier ones; every box is the bounding box of
the *visible* pixels and `area` is the visible pixel count (COCO's segmentation-area convention).
Placements that would hide more than 40% of an earlier shape are re-drawn, so every object stays
recognisable. Every image has its own random stream seeded from (seed, split, index), so the output
is byte-identical for a given seed and does not depend on how many images come before it.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Non-contiguous ids on purpose: they exercise the category-id <-> contiguous-label mapping.
SHAPE_CATEGORIES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (1, "circle", (220, 40, 40)),
    (3, "square", (40, 80, 225)),
    (5, "triangle", (40, 175, 60)),
    (7, "star", (245, 205, 30)),
    (9, "ring", (205, 50, 205)),
    (11, "cross", (250, 130, 20)),
)
SPLIT_INDEX = {"train": 0, "val": 1}

# COCO scale buckets of the visible area in pixels: small < 32^2 <= medium < 96^2 <= large.
SCALE_AREA_RANGES = {"small": (300.0, 950.0), "medium": (1300.0, 8000.0), "large": (10000.0, 30000.0)}
# Fraction of its bounding square that each shape fills; used to pick a size for a target area.
SHAPE_FILL_FRACTION = {
    "circle": 0.785,
    "square": 0.8,
    "triangle": 0.5,
    "star": 0.4,
    "ring": 0.55,
    "cross": 0.55,
}
MIN_VISIBLE_FRACTION = 0.6
PLACEMENT_TRIES = 20
JPEG_QUALITY = 92


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; the defaults are what `ssd data synth` writes."""

    min_side: int = 240
    max_side: int = 400
    max_objects: int = 6
    empty_image_probability: float = 0.03
    colour_jitter: int = 18
    # Probabilities of drawing a small / medium / large target area (COCO buckets, see SCALE_AREA_RANGES).
    scale_probabilities: tuple[float, float, float] = (0.2, 0.5, 0.3)


def _unit_polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices [V, 2] of a shape centred on the origin, randomly rotated."""
    if shape == "square":
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        angle = rng.uniform(-20, 20)
    elif shape == "triangle":
        theta = np.deg2rad([-90.0, 30.0, 150.0])
        points = np.stack([np.cos(theta), np.sin(theta)], axis=1)
        angle = rng.uniform(-30, 30)
    elif shape == "star":
        theta = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
        angle = rng.uniform(0, 72)
    elif shape == "cross":
        a = 0.3  # half the arm width
        points = np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ]
        )
        angle = rng.uniform(-20, 20)
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(shape: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask [height, width] of one shape stretched to fill its box."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse((0, 0, width - 1, height - 1), fill=255)
        if shape == "ring":
            inset_x, inset_y = 0.25 * width, 0.25 * height
            draw.ellipse((inset_x, inset_y, width - 1 - inset_x, height - 1 - inset_y), fill=0)
    else:
        points = _unit_polygon(shape, rng)
        points = (points - points.min(0)) / (points.max(0) - points.min(0)) * [width - 1, height - 1]
        draw.polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas) > 127


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour, so that the saturated shapes stand out from every background."""
    return (rng.uniform(70, 180) + rng.uniform(-25, 25, size=3)).astype(np.float32)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Float32 image [H, W, 3] (0..255) with one of five textures plus sensor-like noise."""
    kind = rng.integers(5)
    colour_a, colour_b = _muted_colour(rng), _muted_colour(rng)
    ys = np.arange(height, dtype=np.float32)[:, None]  # [H, 1]
    xs = np.arange(width, dtype=np.float32)[None, :]  # [1, W]
    if kind == 0:  # flat with strong noise
        weight = np.zeros((height, width), np.float32)
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))
        weight = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    elif kind == 2:  # soft stripes
        angle, period = rng.uniform(0, np.pi), rng.uniform(8, 40)
        phase = (xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))) * np.float32(
            2 * np.pi / period
        )
        weight = 0.5 + 0.5 * np.sin(phase)
    elif kind == 3:  # checker board
        cell = int(rng.integers(10, 41))
        weight = (((xs // cell) + (ys // cell)) % 2).astype(np.float32)
    else:  # blurred blobs: upsampled low-resolution noise
        coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.uint8)
        blobs = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        blobs = blobs.filter(ImageFilter.GaussianBlur(radius=8))
        weight = np.asarray(blobs, dtype=np.float32) / np.float32(255.0)
    image = colour_a + weight[..., None] * (colour_b - colour_a)  # [H, W, 3]
    noise_sigma = np.float32(18.0 if kind == 0 else rng.uniform(3, 10))
    image += noise_sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return image


def _target_side(
    shape: str, rng: np.random.Generator, max_side: int, scale_probabilities: tuple[float, float, float]
) -> int:
    """Side of the shape's bounding square for a visible area drawn from one COCO scale bucket."""
    scale = rng.choice(list(SCALE_AREA_RANGES), p=list(scale_probabilities))
    low, high = SCALE_AREA_RANGES[scale]
    area = rng.uniform(low, high)
    side = math.sqrt(area / SHAPE_FILL_FRACTION[shape])
    return int(min(max(side, 12), max_side))


def render_image(
    rng: np.random.Generator, config: SynthConfig = SynthConfig()
) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """Draw one image. Returns (uint8 [H, W, 3], [(category_id, [x, y, w, h], visible_area), ...])."""
    width = int(rng.integers(config.min_side, config.max_side + 1))
    height = int(rng.integers(config.min_side, config.max_side + 1))
    image = _background(height, width, rng)
    # owner[y, x] = index of the object whose pixel is on top there, -1 for background.
    owner = np.full((height, width), -1, dtype=np.int16)
    full_areas: list[int] = []
    visible_areas = np.zeros(0, dtype=np.int64)  # [objects so far]
    placements: list[tuple[int, int, int, int]] = []  # x0, y0, w, h of each object's drawing box
    categories: list[int] = []

    num_objects = (
        0 if rng.random() < config.empty_image_probability else int(rng.integers(1, config.max_objects + 1))
    )
    for _ in range(num_objects):
        category_index = int(rng.integers(len(SHAPE_CATEGORIES)))
        category_id, shape, colour = SHAPE_CATEGORIES[category_index]
        side = _target_side(shape, rng, int(0.9 * min(width, height)), config.scale_probabilities)
        for _try in range(PLACEMENT_TRIES):
            aspect = rng.uniform(0.8, 1.25)
            box_w = max(int(round(side * math.sqrt(aspect))), 8)
            box_h = max(int(round(side / math.sqrt(aspect))), 8)
            if box_w >= width or box_h >= height:
                side = int(side * 0.8)
                continue
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            mask = _shape_mask(shape, box_w, box_h, rng)
            region = owner[y0 : y0 + box_h, x0 : x0 + box_w]
            # Pixels of each earlier object this one would cover when drawn on top.
            covered = np.bincount(region[mask] + 1, minlength=len(full_areas) + 1)[1:]
            if np.any(visible_areas - covered < MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
                continue
            area = int(mask.sum())
            region[mask] = len(full_areas)
            visible_areas = np.append(visible_areas - covered, area)
            jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
            shade = np.clip(np.asarray(colour) + jitter, 0, 255).astype(np.float32)
            object_noise = rng.standard_normal(size=(area, 3), dtype=np.float32) * np.float32(4.0)
            image[y0 : y0 + box_h, x0 : x0 + box_w][mask] = shade + object_noise
            full_areas.append(area)
            placements.append((x0, y0, box_w, box_h))
            categories.append(category_id)
            break

    objects = []
    for index, (category_id, (x0, y0, box_w, box_h)) in enumerate(zip(categories, placements)):
        # An object's visible pixels lie inside its own drawing box: search only there.
        ys, xs = np.nonzero(owner[y0 : y0 + box_h, x0 : x0 + box_w] == index)
        xs, ys = xs + x0, ys + y0
        x1, y1 = int(xs.min()), int(ys.min())
        box = [float(x1), float(y1), float(xs.max() + 1 - x1), float(ys.max() + 1 - y1)]
        objects.append((category_id, box, int(xs.size)))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_split(
    out: Path, split: str, num_images: int, seed: int, config: SynthConfig, progress: bool
) -> None:
    from tqdm.auto import tqdm

    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"synth {split}", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, SPLIT_INDEX[split], index])
        pixels, objects = render_image(rng, config)
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        (image_dir / file_name).write_bytes(_encode_jpeg(pixels))
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    document = {
        "info": {"description": f"ssd-pipeline synthetic shapes, split {split}, seed {seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in SHAPE_CATEGORIES
        ],
    }
    annotation_dir = out / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    (annotation_dir / f"instances_{split}.json").write_text(json.dumps(document, separators=(",", ":")))


def write_synthetic_dataset(
    out: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    *,
    config: SynthConfig = SynthConfig(),
    progress: bool = True,
) -> Path:
    """Write `OUT/annotations/instances_{train,val}.json` and `OUT/{train,val}/*.jpg`; returns OUT.

    The same seed gives byte-identical JSON and identical pixels.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    out = Path(out)
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(out, split, count, seed, config, progress)
    return out
