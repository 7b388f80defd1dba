"""Augmentation presets on torchvision.transforms.v2, applied to (image, target) samples.

The presets expect what `CocoDataset` hands to its transforms: a uint8 `tv_tensors.Image` and a target
dict whose `boxes` are `tv_tensors.BoundingBoxes`. Geometry and colour work in uint8 (faster, and the
resize has a vectorised uint8 path); the last step converts the image to float 0..1.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

PRESETS = ("ssd", "ssdlite", "flip", "none")
# ImageNet mean pixel in uint8, the "mean pixel" fill of the SSD paper's zoom-out.
MEAN_PIXEL_UINT8 = (124, 116, 104)


class RandomIoUCropIfBoxes(v2.RandomIoUCrop):
    """`RandomIoUCrop` that leaves samples without boxes unchanged.

    The stock transform needs a box centre inside every candidate crop, so on an image without
    boxes it burns its trials until it happens to draw the keep-as-is option.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        boxes = [item for item in flat_inputs if isinstance(item, tv_tensors.BoundingBoxes)]
        if not boxes or boxes[0].shape[0] == 0:
            return {}
        return super().make_params(flat_inputs)


def build_preset(
    name: str,
    size: tuple[int, int] | None = None,
    fill: tuple[int, int, int] | None = None,
) -> v2.Compose:
    """The named augmentation, then SanitizeBoundingBoxes, then (if `size` = (H, W)) a resize to exactly it.

    `ssd`: photometric distortion, zoom-out filled with `fill` (default the mean pixel), IoU crop,
    horizontal flip (the SSD paper's recipe). `ssdlite`: IoU crop and flip. `flip`: horizontal flip only
    (what a short schedule learns fastest from). `none`: nothing random.
    Resizing here lets it run in loader worker processes instead of inside the model.
    """
    fill = tuple(MEAN_PIXEL_UINT8 if fill is None else fill)
    if name == "ssd":
        steps: list[v2.Transform] = [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill={tv_tensors.Image: fill, "others": 0}, side_range=(1.0, 4.0), p=0.5),
            RandomIoUCropIfBoxes(),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    elif name == "ssdlite":
        steps = [RandomIoUCropIfBoxes(), v2.RandomHorizontalFlip(p=0.5)]
    elif name == "flip":
        steps = [v2.RandomHorizontalFlip(p=0.5)]
    elif name == "none":
        steps = []
    else:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")
    steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    if size is not None:
        height, width = size
        steps.append(v2.Resize((int(height), int(width)), antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)
