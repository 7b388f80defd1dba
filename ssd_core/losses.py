"""The multibox loss: smooth L1 on matched boxes, cross-entropy with hard negative mining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.boxes import encode


def multibox_loss(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    matches: Tensor,
    *,
    box_weights: tuple[float, float, float, float],
    neg_to_pos_ratio: float = 3.0,
) -> dict[str, Tensor]:
    """Losses for a batch, both normalised by the number of matched default boxes.

    cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4] xyxy, gt_boxes [B, G, 4],
    gt_labels [B, G], matches [B, A] (index into G or -1).

    Negatives are the highest-loss background boxes, `neg_to_pos_ratio` per positive in the same
    image (3:1 in the paper); an image with no objects contributes no classification loss.
    """
    cls_logits = cls_logits.float()
    bbox_regression = bbox_regression.float()
    foreground = matches >= 0  # [B, A]
    num_foreground = int(foreground.sum())
    safe_matches = matches.clamp(min=0)
    if gt_boxes.shape[1] == 0:  # no objects in the whole batch: one dummy box nobody matches
        gt_boxes = gt_boxes.new_zeros((gt_boxes.shape[0], 1, 4))
        gt_labels = gt_labels.new_zeros((gt_labels.shape[0], 1))

    matched_boxes = torch.gather(gt_boxes, 1, safe_matches[..., None].expand(-1, -1, 4))  # [B, A, 4]
    fg_targets = encode(matched_boxes[foreground], anchors.expand_as(matched_boxes)[foreground], box_weights)
    bbox_loss = F.smooth_l1_loss(bbox_regression[foreground], fg_targets, reduction="sum")

    cls_targets = torch.gather(gt_labels, 1, safe_matches).masked_fill(~foreground, 0)  # [B, A]
    num_classes = cls_logits.shape[-1]
    cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none")
    cls_loss = cls_loss.view_as(cls_targets)  # [B, A]

    # Hard negative mining: rank background boxes by loss within each image.
    num_negative = neg_to_pos_ratio * foreground.sum(dim=1, keepdim=True)  # [B, 1]
    negative_loss = cls_loss.masked_fill(foreground, -float("inf"))
    order = negative_loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # [B, A] position of each box in the descending order
    negatives = rank < num_negative

    normaliser = max(1, num_foreground)
    return {
        "bbox_regression": bbox_loss / normaliser,
        "classification": (cls_loss[foreground].sum() + cls_loss[negatives].sum()) / normaliser,
    }
