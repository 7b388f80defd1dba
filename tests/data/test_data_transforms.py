"""Augmentation presets: boxes stay inside and on the object, flips mirror, resize hits the size."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from ssd_core.data import build_preset

HEIGHT, WIDTH = 120, 200
RED_BOX = [20.0, 30.0, 60.0, 90.0]  # x1, y1, x2, y2


def _sample(boxes=(RED_BOX,)):
    """uint8 grey image with a red rectangle exactly under the (single) box."""
    image = torch.full((3, HEIGHT, WIDTH), 100, dtype=torch.uint8)
    for x1, y1, x2, y2 in boxes:
        image[:, int(y1) : int(y2), int(x1) : int(x2)] = torch.tensor([230, 10, 10], dtype=torch.uint8)[
            :, None, None
        ]
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=(HEIGHT, WIDTH)
        ),
        "labels": torch.arange(1, len(boxes) + 1),
        "image_id": 5,
        "orig_size": (HEIGHT, WIDTH),
    }
    return tv_tensors.Image(image), target


def _red_extent(image: torch.Tensor) -> list[float]:
    # saturated pixels: grey background and the mean-pixel fill have a channel spread below 0.08,
    # the red object keeps more than 0.15 through any photometric distortion (channels may be permuted)
    red = (image.amax(dim=0) - image.amin(dim=0)) > 0.15
    ys, xs = torch.nonzero(red, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("name", ["ssd", "ssdlite", "flip", "none"])
def test_boxes_stay_inside_image_and_target_passes_through(name):
    preset = build_preset(name)
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = preset(*_sample())
        assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        height, width = image.shape[-2:]
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and tuple(boxes.canvas_size) == (height, width)
        assert len(boxes) == len(target["labels"])
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
        assert target["image_id"] == 5 and target["orig_size"] == (HEIGHT, WIDTH)


def test_ssdlite_boxes_follow_the_object_and_flip_mirrors():
    preset = build_preset("ssdlite")
    mirrored = [WIDTH - RED_BOX[2], RED_BOX[1], WIDTH - RED_BOX[0], RED_BOX[3]]
    seen_flipped = seen_unflipped = False
    for seed in range(60):
        torch.manual_seed(seed)
        image, target = preset(*_sample())
        assert len(target["boxes"]) == 1  # IoU crop keeps the only box's centre inside
        box = target["boxes"][0].tolist()
        assert box == pytest.approx(_red_extent(image), abs=1.0)
        if image.shape[-2:] == (HEIGHT, WIDTH):  # the IoU crop chose "keep the whole image"
            if box == pytest.approx(mirrored):
                seen_flipped = True
            else:
                assert box == pytest.approx(RED_BOX)
                seen_unflipped = True
    assert seen_flipped and seen_unflipped


def test_flip_preset_only_mirrors():
    mirrored = [WIDTH - RED_BOX[2], RED_BOX[1], WIDTH - RED_BOX[0], RED_BOX[3]]
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = build_preset("flip")(*_sample())
        assert image.shape[-2:] == (HEIGHT, WIDTH)
        box = target["boxes"][0].tolist()
        assert box == pytest.approx(_red_extent(image))
        seen.add("flipped" if box == pytest.approx(mirrored) else "kept")
    assert seen == {"flipped", "kept"}


def test_ssd_zoom_out_fills_with_mean_pixel_and_keeps_box_on_object():
    preset = build_preset("ssd")
    zoomed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = preset(*_sample())
        if len(target["boxes"]):
            assert target["boxes"][0].tolist() == pytest.approx(_red_extent(image), abs=1.5)
        corner = (image[:, 0, 0] * 255).round().tolist()
        if image.shape[-2:] != (HEIGHT, WIDTH) and corner == [124, 116, 104]:
            zoomed += 1
    assert zoomed > 0


def test_resize_to_exact_size_scales_boxes():
    image, target = build_preset("none", size=(60, 300))(*_sample())
    assert image.shape == (3, 60, 300)
    expected = [RED_BOX[0] * 1.5, RED_BOX[1] * 0.5, RED_BOX[2] * 1.5, RED_BOX[3] * 0.5]
    assert target["boxes"][0].tolist() == pytest.approx(expected)
    for seed in range(10):
        torch.manual_seed(seed)
        image, target = build_preset("ssd", size=(64, 64))(*_sample())
        assert image.shape == (3, 64, 64) and tuple(target["boxes"].canvas_size) == (64, 64)


@pytest.mark.parametrize("name", ["ssd", "ssdlite"])
def test_images_without_boxes_pass(name):
    for seed in range(10):
        torch.manual_seed(seed)
        image, target = build_preset(name, size=(50, 50))(*_sample(boxes=()))
        assert (
            image.shape == (3, 50, 50) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        )


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown augmentation preset 'yolo'"):
        build_preset("yolo")
