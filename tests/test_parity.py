"""Parity with torchvision: its state_dict loads into ssd_core and both give the same detections
and losses (fp32) on the same images, including non-square sizes, a box touching the border and an
image without boxes."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ssd_core import build_model

TV_BUILDERS = {
    "ssd300_vgg16": torchvision.models.detection.ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": torchvision.models.detection.ssdlite320_mobilenet_v3_large,
}


def _images_and_targets(num_classes: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    sizes = [(300, 300), (240, 410), (375, 200)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 120.0, 200.0], [150.0, 30.0, 300.0, 290.0]]),
         "labels": torch.tensor([1, num_classes - 1])},
        {"boxes": torch.tensor([[0.0, 0.0, 60.0, 50.0], [200.0, 100.0, 410.0, 240.0], [5.0, 5.0, 12.0, 14.0]]),
         "labels": torch.tensor([3, 7, 2])},  # touches the border; one tiny box
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no boxes
    ]
    return images, targets


@pytest.fixture(scope="module", params=list(TV_BUILDERS))
def pair(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(0)
    reference = TV_BUILDERS[arch](weights=None, weights_backbone=None, num_classes=91)
    # SSDLite's N(0, 0.03) init makes every score exactly 1/91, and ties make the order arbitrary:
    # give its convolutions He init so scores spread out (the check is on equivalence, not accuracy).
    if arch.startswith("ssdlite"):
        with torch.no_grad():
            for module in reference.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    path = tmp_path_factory.mktemp("w") / f"{arch}.pt"
    torch.save(reference.state_dict(), path)
    ours = build_model(arch, weights=str(path))
    return arch, reference, ours


def test_detections_match_torchvision(pair):
    arch, reference, ours = pair
    images, _ = _images_and_targets(91)
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    for i, (e, o) in enumerate(zip(expected, got)):
        assert e["boxes"].shape[0] > 0, "random weights should still give detections"
        assert e["scores"].unique().numel() == e["scores"].numel(), "ties would make the order arbitrary"
        assert e["boxes"].shape == o["boxes"].shape, f"{arch} image {i}"
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-4, rtol=1e-5)
        assert torch.equal(o["labels"], e["labels"]), f"{arch} image {i}: labels differ"


def test_losses_match_torchvision(pair):
    arch, reference, ours = pair
    images, targets = _images_and_targets(91)
    reference.train()
    ours.train()
    # BatchNorm in train mode would update running stats differently per call: compare one call each
    torch.manual_seed(1)
    expected = reference(images, targets)
    got = ours(images, targets)
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-5)
    assert expected["bbox_regression"] > 0
