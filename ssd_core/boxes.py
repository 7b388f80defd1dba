"""Box math as small pure functions. Boxes are xyxy in pixels unless a name says otherwise.

The coder follows the SSD paper (and torchvision's BoxCoder) exactly, including the order of the
floating-point operations, so that our losses and detections match torchvision's within float noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

# Largest log-scale delta decoded; exp() beyond it overflows box sizes (same clip as torchvision).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def encode(gt_boxes: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets of `gt_boxes` relative to `anchors`: FloatTensor[..., 4] (dx, dy, dw, dh).

    Both inputs are [..., 4] xyxy and broadcast against each other.
    """
    wx, wy, ww, wh = weights
    ex_w = anchors[..., 2] - anchors[..., 0]
    ex_h = anchors[..., 3] - anchors[..., 1]
    ex_cx = anchors[..., 0] + 0.5 * ex_w
    ex_cy = anchors[..., 1] + 0.5 * ex_h
    gt_w = gt_boxes[..., 2] - gt_boxes[..., 0]
    gt_h = gt_boxes[..., 3] - gt_boxes[..., 1]
    gt_cx = gt_boxes[..., 0] + 0.5 * gt_w
    gt_cy = gt_boxes[..., 1] + 0.5 * gt_h
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * torch.log(gt_w / ex_w)
    dh = wh * torch.log(gt_h / ex_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode(rel_codes: Tensor, anchors: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Inverse of `encode`: xyxy boxes [..., 4] from codes [..., 4] and anchors [..., 4] (broadcast)."""
    anchors = anchors.to(rel_codes.dtype)
    wx, wy, ww, wh = weights
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dx = rel_codes[..., 0] / wx
    dy = rel_codes[..., 1] / wy
    dw = torch.clamp(rel_codes[..., 2] / ww, max=BBOX_XFORM_CLIP)
    dh = torch.clamp(rel_codes[..., 3] / wh, max=BBOX_XFORM_CLIP)
    pred_cx = dx * widths + ctr_x
    pred_cy = dy * heights + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    return torch.stack((pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h), dim=-1)


def clip_to_size(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp xyxy boxes [..., 4] to an image of `size` = (H, W)."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def scale_boxes(boxes: Tensor, scale_xy: Tensor) -> Tensor:
    """Multiply xyxy boxes [..., 4] by per-box (sx, sy) factors [..., 2]."""
    return boxes * scale_xy.repeat_interleave(2, dim=-1)[..., [0, 2, 1, 3]]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) [..., 4] -> xyxy [..., 4], in the same units."""
    return torch.cat((boxes[..., :2] - 0.5 * boxes[..., 2:], boxes[..., :2] + 0.5 * boxes[..., 2:]), dim=-1)


def batched_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of per-image boxes [B, G, 4] against shared anchors [A, 4] -> [B, G, A]."""
    batch, num_boxes = boxes.shape[:2]
    return box_iou(boxes.reshape(-1, 4), anchors).view(batch, num_boxes, -1)
