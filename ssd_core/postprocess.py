"""Detections from head outputs for a whole batch: decode, score filter, per-class top-k, NMS, cap.

The result is the same as running the SSD recipe image by image and class by class (torchvision's
way), but with no Python loop over images or classes:

1. per (image, class) keep the `topk_candidates` best default boxes above `score_thresh`;
2. per image keep the `pool_size` best of those across classes. Greedy NMS restricted to the
   highest-scoring boxes of a class equals the full NMS result restricted to them, so if at least
   `detections_per_img` survive NMS within the pool, the final top detections are exactly those of
   the full set. Otherwise (rare: heavy suppression) the pool grows and the step is repeated;
3. NMS with each (image, class) group offset into its own coordinate range (torchvision's
   coordinate trick) so that groups never suppress each other: one call for the batch on GPU, one
   call per image on CPU, where the kernel's cost grows with (kept x candidates);
4. per image keep the `detections_per_img` best.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from ssd_core.boxes import clip_to_size, decode, scale_boxes


@dataclass
class PostProcessConfig:
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 200
    topk_candidates: int = 400
    pool_size: int = 1000  # candidates per image entering NMS in the first pass (see module doc)


def postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    original_sizes: Tensor,
    config: PostProcessConfig,
    box_weights: tuple[float, float, float, float],
) -> list[dict[str, Tensor]]:
    """cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4] xyxy in the resized input of
    `image_size` (H, W), original_sizes LongTensor[B, 2] (H, W) -> per image
    {"boxes": FloatTensor[N, 4] xyxy in original pixels, "labels": Int64[N], "scores": FloatTensor[N]},
    sorted by score.
    """
    top_scores, top_anchor, k = class_candidates(cls_logits, config)
    num_valid = (top_scores > config.score_thresh).sum(dim=1)  # [B]

    total = top_scores.shape[1]
    pool = min(config.pool_size, total)
    exporting = torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    while True:
        result, kept_per_image = _select(
            top_scores, top_anchor, k, pool, bbox_regression, anchors, image_size, config, box_weights
        )
        if exporting or pool >= total:
            break
        starved = (kept_per_image < config.detections_per_img) & (num_valid > pool)
        if not bool(starved.any()):
            break
        pool = min(pool * 4, total)

    boxes, scores_out, labels, counts, image_index = result
    ratio = original_sizes.to(boxes) / torch.tensor(image_size, dtype=boxes.dtype, device=boxes.device)  # [B, 2]
    boxes = scale_boxes(boxes, ratio.flip(-1)[image_index])  # (sx, sy) per box
    counts = counts.tolist()
    return [
        {"boxes": bx, "labels": lb, "scores": sc}
        for bx, lb, sc in zip(boxes.split(counts), labels.split(counts), scores_out.split(counts))
    ]


def class_candidates(cls_logits: Tensor, config: PostProcessConfig) -> tuple[Tensor, Tensor, int]:
    """Step 1: per (image, class) the `topk_candidates` best default boxes.

    cls_logits [B, A, C] -> scores [B, (C-1)*k] (-1 where not above `score_thresh`), their default
    box indices [B, (C-1)*k], and k. Column c*k + j holds class c+1's j-th best box.
    """
    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:]  # [B, A, C-1], background dropped
    k = min(config.topk_candidates, scores.shape[1])
    top_scores, top_anchor = scores.transpose(1, 2).topk(k, dim=2)  # [B, C-1, k]
    top_scores = top_scores.flatten(1)
    top_scores = top_scores.masked_fill(top_scores <= config.score_thresh, -1.0)
    return top_scores, top_anchor.flatten(1), k


def pool_candidates(
    top_scores: Tensor, top_anchor: Tensor, k: int, pool: int, bbox_regression: Tensor, anchors: Tensor,
    image_size: tuple[int, int], box_weights: tuple[float, float, float, float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 2: per image the `pool` best candidates across classes, decoded and clipped.

    Returns scores [B, P], labels [B, P] (1-based) and boxes [B, P, 4] in input pixels.
    """
    pool_scores, pool_pos = top_scores.topk(pool, dim=1)  # [B, P]
    pool_anchor = torch.gather(top_anchor, 1, pool_pos)  # [B, P]
    pool_label = torch.div(pool_pos, k, rounding_mode="floor") + 1  # [B, P]
    rel = torch.gather(bbox_regression.float(), 1, pool_anchor.unsqueeze(-1).expand(-1, -1, 4))  # [B, P, 4]
    boxes = clip_to_size(decode(rel, anchors[pool_anchor], box_weights), image_size)  # [B, P, 4]
    return pool_scores, pool_label, boxes


def _select(top_scores, top_anchor, k, pool, bbox_regression, anchors, image_size, config, box_weights):
    """One pass of steps 2-4 with a pool of `pool` candidates per image."""
    batch = top_scores.shape[0]
    device = top_scores.device
    pool_scores, pool_label, boxes = pool_candidates(
        top_scores, top_anchor, k, pool, bbox_regression, anchors, image_size, box_weights
    )

    valid = pool_scores > config.score_thresh  # [B, P]
    image_index = torch.arange(batch, device=device)[:, None].expand_as(pool_label)[valid]  # [n]
    flat_boxes, flat_scores, flat_labels = boxes[valid], pool_scores[valid], pool_label[valid]
    num_classes = int(top_scores.shape[1] // k) + 1
    # Each (image, class) group gets its own coordinate range, larger than any box.
    group = image_index * num_classes + flat_labels
    offset = float(max(image_size) + 1)
    shifted = flat_boxes + (group * offset)[:, None].to(flat_boxes)
    if shifted.device.type == "cpu" and batch > 1 and not torch.jit.is_tracing():
        # The CPU kernel compares every kept box with every later candidate, so one call over the
        # batch costs O(batch^2); one call per image (candidates are image-major) stays linear.
        counts = valid.sum(dim=1).tolist()
        starts = [0, *itertools.accumulate(counts)][:-1]
        keep = torch.cat([
            nms(part, part_scores, config.nms_thresh) + start
            for part, part_scores, start in zip(shifted.split(counts), flat_scores.split(counts), starts)
        ])
    else:
        keep = nms(shifted, flat_scores, config.nms_thresh)

    # keep is sorted by score; regroup per image (stable) and cap each image's count.
    kept_image = image_index[keep]
    order = torch.sort(kept_image, stable=True).indices
    keep, kept_image = keep[order], kept_image[order]
    kept_per_image = torch.bincount(kept_image, minlength=batch)  # [B]
    first = torch.cumsum(kept_per_image, 0) - kept_per_image
    rank = torch.arange(keep.numel(), device=device) - first[kept_image]
    capped = rank < config.detections_per_img
    keep, kept_image = keep[capped], kept_image[capped]
    counts = torch.bincount(kept_image, minlength=batch)
    return (flat_boxes[keep], flat_scores[keep], flat_labels[keep], counts, kept_image), kept_per_image
