"""ssd_core.visualize: what lands on the pixels, grid geometry, training curves from metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_core import visualize

CLASS_NAMES = ["__background__", "cat", "dog", "bird"]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("background", [0.0, 1.0], ids=["black", "white"])
def test_boxes_carry_class_colour_and_dark_halo_on_any_background(background):
    image = torch.full((3, 200, 300), background)
    boxes = torch.tensor([[50.0, 60.0, 150.0, 180.0]])
    drawn = _pixels(visualize.draw_detections(image, boxes, torch.tensor([2]), torch.tensor([0.9]), CLASS_NAMES))
    assert drawn.shape == (200, 300, 3)
    edge = drawn[120, 48:56]  # a horizontal cut through the left edge, far from the label
    colour = visualize.class_colour(2)
    assert (edge == colour).all(axis=1).any(), "box line in the class colour"
    assert (edge.sum(axis=1) == 0).any(), "dark halo next to the coloured line"
    assert (drawn[120, 100] == round(background * 255)).all(), "box interior untouched"


def test_label_sits_above_box_on_a_filled_background():
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    drawn = _pixels(visualize.draw_detections(image, [[100, 120, 300, 280]], [1], [0.75], CLASS_NAMES))
    colour = np.array(visualize.class_colour(1))
    in_colour = (drawn[:119] == colour).all(axis=2)  # above the box's top edge (y=120, halo at 119)
    rows, cols = np.nonzero(in_colour)
    assert rows.size, "label background above the box"
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    assert bottom >= 110 and 98 <= left <= 101, "label touches the box's top-left corner"
    assert 10 <= bottom - top <= 30 and 30 <= right - left <= 120, "label box sized to the text"
    label = drawn[top:bottom + 1, left:right + 1].astype(int)
    assert in_colour[top:bottom + 1, left:right + 1].mean() > 0.5, "filled label background"
    text_colour = np.array(visualize._text_colour(tuple(colour)))
    assert (np.abs(label - text_colour).sum(axis=2) < 60).sum() > 20, "text in the contrasting colour"
    assert _pixels(image)[100, 150].tolist() == [255, 255, 255], "input image is not modified"


def test_score_threshold_and_inputs():
    image_uint8 = torch.zeros((3, 100, 100), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]])
    drawn = _pixels(visualize.draw_detections(image_uint8, boxes, torch.tensor([1, 3]), torch.tensor([0.9, 0.1]),
                                              CLASS_NAMES, score_threshold=0.5))
    assert drawn[25, 8:14].any(), "high-scoring box drawn"
    assert not drawn[55:100, 55:100].any(), "low-scoring box left out"
    empty = visualize.draw_detections(image_uint8, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64),
                                      torch.zeros(0), CLASS_NAMES)
    assert not _pixels(empty).any()


def test_ground_truth_beside_predictions_and_grid():
    image = Image.new("RGB", (160, 120), (90, 90, 90))
    pair = visualize.draw_ground_truth_beside(image, [[10, 20, 80, 100]], [1], [[12, 22, 78, 98]], [1], [0.8],
                                              CLASS_NAMES)
    assert pair.width > 2 * 160 and pair.height > 120  # two panels plus a title strip
    halves = _pixels(pair)
    assert (halves[:, :160] == visualize.class_colour(1)).all(axis=2).any()
    assert (halves[:, 170:] == visualize.class_colour(1)).all(axis=2).any()

    cells = [Image.new("RGB", (50 + 10 * i, 40), (0, 0, 0)) for i in range(5)]
    grid = visualize.make_grid_image(cells, padding=2)
    assert grid.size == (3 * 90 + 4 * 2, 2 * 40 + 3 * 2)  # 3 columns of the widest cell, 2 rows
    assert visualize.make_grid_image(cells, columns=5).size[1] == 40 + 2 * 6
    with pytest.raises(ValueError):
        visualize.make_grid_image([])


def test_training_curves_tolerate_missing_keys_and_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "epoch": 0, "step": s, "loss": 5.0 - s / 10, "lr": 0.01 * s,
                         "bbox_regression": 2.0, "classification": 3.0 - s / 10, "images_per_s": 12.5})
             for s in range(1, 20)]
    lines.insert(3, json.dumps({"kind": "train", "epoch": 0, "step": 4}))  # no numbers at all
    lines.append(json.dumps({"kind": "eval", "epoch": 0, "step": 19, "AP": 0.1, "AP50": 0.3, "APs": None}))
    lines.append('{"kind": "train", "epoch": 1, "st')  # being written
    path.write_text("\n".join(lines))
    records = visualize.read_metrics_jsonl(path)
    assert len(records) == 21

    out = visualize.plot_training_curves(path, tmp_path / "curves.png")
    with Image.open(out) as picture:
        assert picture.size == (1200, 800)

    only_train = tmp_path / "train_only.jsonl"
    only_train.write_text("\n".join(lines[:5]) + "\n\n")
    visualize.plot_training_curves(only_train, tmp_path / "early.png")
    assert (tmp_path / "early.png").stat().st_size > 0
