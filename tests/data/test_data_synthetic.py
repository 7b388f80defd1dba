"""The synthetic shapes dataset: deterministic bytes, class and scale mix, valid COCO (read by pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from ssd_core.data import write_synthetic_dataset


def _load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = write_synthetic_dataset(tmp_path / "a", 6, 3, seed=7, progress=False)
    second = write_synthetic_dataset(tmp_path / "b", 6, 3, seed=7, progress=False)
    other = write_synthetic_dataset(tmp_path / "c", 6, 3, seed=8, progress=False)
    files_first, files_second = _tree_bytes(first), _tree_bytes(second)
    assert len(files_first) == 2 + 6 + 3
    assert files_first == files_second
    other_json = (other / "annotations" / "instances_train.json").read_bytes()
    assert other_json != files_first["annotations/instances_train.json"]


def test_layout_classes_and_image_sizes(synth_dir):
    coco = _load_coco(synth_dir / "annotations" / "instances_train.json")
    category_ids = sorted(coco.getCatIds())
    assert len(category_ids) >= 5
    assert category_ids != list(range(1, len(category_ids) + 1)), "ids should be non-contiguous"
    assert all(cat["name"] and not cat["name"].isdigit() for cat in coco.loadCats(category_ids))
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == 24
    sizes = {(image["width"], image["height"]) for image in images}
    assert len(sizes) > 10 and any(w != h for w, h in sizes)
    for image in images:
        with Image.open(synth_dir / "train" / image["file_name"]) as opened:
            assert opened.format == "JPEG"
            assert opened.size == (image["width"], image["height"])
    # every box lies inside its image and is non-degenerate
    for annotation in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = annotation["bbox"]
        image = coco.imgs[annotation["image_id"]]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert 0 < annotation["area"] <= w * h


def test_scale_mix_by_coco_area_and_overlaps(tmp_path):
    root = write_synthetic_dataset(tmp_path, 120, 0, seed=1, progress=False)
    document = json.loads((root / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in document["annotations"]])
    small, medium, large = (
        (areas < 32**2).mean(),
        ((areas >= 32**2) & (areas < 96**2)).mean(),
        (areas >= 96**2).mean(),
    )
    assert 0.1 <= small <= 0.35, small
    assert medium >= 0.3 and large >= 0.15, (medium, large)
    per_image = np.bincount([a["image_id"] for a in document["annotations"]], minlength=121)[1:]
    assert per_image.max() <= 6 and per_image.mean() > 2
    assert len(set(a["category_id"] for a in document["annotations"])) == len(document["categories"])
    # partial occlusion: some objects' visible area is clearly less than their box suggests for their shape
    boxes = np.array([a["bbox"] for a in document["annotations"]])
    image_ids = np.array([a["image_id"] for a in document["annotations"]])
    overlapping = 0
    for image_id in np.unique(image_ids):
        b = boxes[image_ids == image_id]
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
        inter_w = np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None)
        inter_h = np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None)
        overlapping += int(np.triu(inter_w * inter_h > 0, 1).sum())
    assert overlapping > 10


def test_boxes_are_visible_object_extent():
    """Before JPEG encoding, each object's colour (within jitter) touches all four edges of its box."""
    from ssd_core.data.synthetic import SHAPE_CATEGORIES, SynthConfig, render_image

    colours = {cid: np.array(colour, dtype=float) for cid, _, colour in SHAPE_CATEGORIES}
    tolerance = SynthConfig().colour_jitter + 25  # jitter plus the object's pixel noise (sigma 4)
    checked = 0
    for index in range(10):
        pixels, objects = render_image(np.random.default_rng([3, index]))
        for category_id, (x, y, w, h), area in objects:
            x, y, w, h = int(x), int(y), int(w), int(h)
            inside = np.abs(pixels[y : y + h, x : x + w] - colours[category_id]).max(axis=2) < tolerance
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # every visible pixel has the object's colour (other same-coloured pixels may add to the count)
            assert int(inside.sum()) >= 0.97 * area and area <= w * h
            checked += 1
    assert checked > 10


def test_scale_probabilities_are_configurable():
    from ssd_core.data.synthetic import SynthConfig, render_image

    config = SynthConfig(scale_probabilities=(0.0, 1.0, 0.0))
    areas = [area for i in range(15) for *_, area in render_image(np.random.default_rng([5, i]), config)[1]]
    assert len(areas) > 10
    assert max(areas) < 96**2  # no large object at all
    assert np.mean(np.array(areas) >= 32**2) > 0.8  # small only through partial occlusion
