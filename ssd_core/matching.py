"""Matching default boxes to ground truth, for a whole batch at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ssd_core.boxes import batched_iou


def match_anchors(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, iou_threshold: float) -> Tensor:
    """Index of the ground-truth box each default box regresses to, or -1 for background.

    gt_boxes [B, G, 4] xyxy (padded), gt_valid bool [B, G], anchors [A, 4] -> LongTensor[B, A].

    A default box takes its best-overlapping ground truth when IoU >= `iou_threshold`; then every
    ground-truth box is forced onto its single best default box (the paper's first matching step),
    so that no object goes unmatched however small it is.
    """
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[0]
    if num_gt == 0:
        return torch.full((batch, num_anchors), -1, dtype=torch.int64, device=anchors.device)
    iou = batched_iou(gt_boxes, anchors)  # [B, G, A]
    iou = iou.masked_fill(~gt_valid[..., None], -1.0)  # padding never wins
    best_iou, matches = iou.max(dim=1)  # [B, A]
    matches = matches.masked_fill(best_iou < iou_threshold, -1)

    _, best_anchor = iou.max(dim=2)  # [B, G]
    image_index = torch.arange(batch, device=anchors.device)[:, None].expand(batch, num_gt)  # [B, G]
    gt_index = torch.arange(num_gt, device=anchors.device)[None].expand(batch, num_gt)  # [B, G]
    flat_target = (image_index * num_anchors + best_anchor)[gt_valid]
    matches.view(-1)[flat_target] = gt_index[gt_valid]
    return matches


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into padded tensors: boxes [B, G, 4], labels [B, G], valid [B, G]."""
    counts = [int(t["boxes"].shape[0]) for t in targets]
    batch, num_gt = len(targets), max(counts, default=0)
    boxes = torch.zeros((batch, num_gt, 4), dtype=torch.float32, device=device)
    labels = torch.zeros((batch, num_gt), dtype=torch.int64, device=device)
    valid = torch.arange(num_gt, device=device)[None] < torch.tensor(counts, device=device)[:, None]
    if num_gt:
        boxes[valid] = torch.cat([t["boxes"] for t in targets]).to(device, torch.float32)
        labels[valid] = torch.cat([t["labels"] for t in targets]).to(device, torch.int64)
    return boxes, labels, valid
