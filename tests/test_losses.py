import torch

from ssd_core.losses import multibox_loss

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _setup(num_anchors=50, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_anchors, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 20], 1)
    logits = torch.randn(2, num_anchors, num_classes, generator=g)
    regression = torch.randn(2, num_anchors, 4, generator=g) * 0.1
    return anchors, logits, regression


def test_hard_negatives_three_per_positive():
    anchors, logits, regression = _setup()
    gt_boxes = anchors[[3, 7]].unsqueeze(0).repeat(2, 1, 1)
    gt_labels = torch.tensor([[1, 2], [3, 1]])
    matches = torch.full((2, 50), -1)
    matches[0, 3], matches[0, 7] = 0, 1  # image 0: 2 positives -> 6 negatives
    matches[1, 3] = 0  # image 1: 1 positive -> 3 negatives
    losses = multibox_loss(logits, regression, anchors, gt_boxes, gt_labels, matches, box_weights=WEIGHTS)

    # Independent reference: pick negatives by sorting each image's background losses by hand.
    ce = torch.nn.functional.cross_entropy
    expected = 0.0
    for b, (positives, n_neg) in enumerate([([3, 7], 6), ([3], 3)]):
        targets = torch.zeros(50, dtype=torch.int64)
        for j, a in enumerate(positives):
            targets[a] = gt_labels[b, j]
        per_box = ce(logits[b], targets, reduction="none")
        background = [a for a in range(50) if a not in positives]
        hardest = sorted(background, key=lambda a: -per_box[a].item())[:n_neg]
        expected += per_box[positives].sum() + per_box[hardest].sum()
    torch.testing.assert_close(losses["classification"], expected / 3)


def test_empty_targets_give_zero_loss_without_nan():
    anchors, logits, regression = _setup()
    logits.requires_grad_(True)
    matches = torch.full((2, 50), -1)
    losses = multibox_loss(logits, regression, anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.int64),
                           matches, box_weights=WEIGHTS)
    assert losses["bbox_regression"] == 0 and losses["classification"] == 0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_regression_loss_is_zero_for_perfect_offsets():
    anchors, logits, _ = _setup()
    gt_boxes = (anchors[[5]] + torch.tensor([2.0, 1.0, 4.0, 3.0])).unsqueeze(0).repeat(2, 1, 1)
    matches = torch.full((2, 50), -1)
    matches[:, 5] = 0
    from ssd_core.boxes import encode

    regression = torch.zeros(2, 50, 4)
    regression[:, 5] = encode(gt_boxes[:, 0], anchors[5], WEIGHTS)
    losses = multibox_loss(logits, regression, anchors, gt_boxes, torch.ones(2, 1, dtype=torch.int64), matches,
                           box_weights=WEIGHTS)
    assert losses["bbox_regression"].abs() < 1e-6
