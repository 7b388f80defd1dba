import torch
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from ssd_core.matching import match_anchors, pad_targets


def _grid_anchors(n=10, size=30.0):
    xs = torch.arange(n) * size
    x, y = torch.meshgrid(xs, xs, indexing="ij")
    return torch.stack([x.flatten(), y.flatten(), x.flatten() + size, y.flatten() + size], 1)


def test_matches_torchvision_per_image_with_padding():
    g = torch.Generator().manual_seed(0)
    anchors = torch.cat([_grid_anchors(), _grid_anchors(5, 60.0)])
    targets = []
    for n in (3, 0, 5):
        xy = torch.rand(n, 2, generator=g) * 200
        targets.append({"boxes": torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 80], 1),
                        "labels": torch.ones(n, dtype=torch.int64)})
    boxes, labels, valid = pad_targets(targets, torch.device("cpu"))
    matches = match_anchors(boxes, valid, anchors, 0.5)
    matcher = SSDMatcher(0.5)
    for b, t in enumerate(targets):
        if t["boxes"].numel() == 0:
            assert (matches[b] == -1).all()
            continue
        assert torch.equal(matches[b], matcher(box_iou(t["boxes"], anchors)))


def test_every_box_is_forced_onto_its_best_anchor():
    anchors = _grid_anchors()
    tiny = torch.tensor([[[31.0, 31.0, 36.0, 36.0]]])  # IoU far below 0.5 with every anchor
    matches = match_anchors(tiny, torch.ones(1, 1, dtype=torch.bool), anchors, 0.5)
    assert (matches == 0).sum() == 1
    best = box_iou(tiny[0], anchors).argmax()
    assert matches[0, best] == 0


def test_no_ground_truth_at_all():
    anchors = _grid_anchors()
    boxes, labels, valid = pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}],
                                       torch.device("cpu"))
    assert (match_anchors(boxes, valid, anchors, 0.5) == -1).all()
