import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from ssd_core.anchors import DefaultBoxes
from ssd_core.zoo import CONFIGS


def _torchvision_boxes(generator, grid, size):
    images = ImageList(torch.zeros(1, 3, *size), [size])
    features = [torch.zeros(1, 1, *g) for g in grid]
    return generator(images, features)[0]


@pytest.mark.parametrize(
    "aspect_ratios, kwargs, size, grid",
    [
        ([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
         dict(scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300]),
         (300, 300), [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]),
        ([[2, 3]] * 6, dict(min_ratio=0.2, max_ratio=0.95), (320, 320),
         [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]),
        ([[2], [3]], dict(), (200, 300), [(7, 11), (3, 4)]),  # non-square, no steps
    ],
)
def test_default_boxes_equal_torchvision(aspect_ratios, kwargs, size, grid):
    ours = DefaultBoxes(aspect_ratios, **kwargs)
    theirs = DefaultBoxGenerator(aspect_ratios, **kwargs)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    torch.testing.assert_close(ours.xyxy(grid, size), _torchvision_boxes(theirs, grid, size))


@pytest.mark.parametrize("arch, expected", [("ssd300_vgg16", 8732), ("ssd512_vgg16", 24564), ("ssd300_resnet50", 8732)])
def test_official_tilings(arch, expected):
    from ssd_core import build_model

    model = build_model(arch).eval()
    with torch.no_grad():
        batch, _ = model.preprocess([torch.rand(3, *model.size)])
        features = model.backbone(batch)
    assert model.anchors(features).shape == (expected, 4)
    steps = CONFIGS[arch].steps
    # Each feature map has size / step cells (rounded up), the paper's tiling.
    assert [f.shape[-1] for f in features] == [-(-model.size[0] // s) if s < model.size[0] else 1 for s in steps]


def test_scales_validation():
    with pytest.raises(ValueError, match="scales needs 3 entries"):
        DefaultBoxes([[2], [2]], scales=[0.1, 0.2])
