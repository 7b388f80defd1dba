"""Detections from head outputs for a whole batch: decode, score filter, per-class top-k, NMS, cap.

The result is the same as running the SSD recipe image by image and class by class (torchvision's
way), but with no Python loop over images or classes:

1. per (image, class) keep the `topk_candidates` best default boxes above `score_thresh`;
2. per image keep the `pool_size` best of those across classes. Greedy NMS restricted to the
   highest-scoring boxes of a class equals the full NMS result restricted to them, so if at least
   `detections_per_img` survive NMS within the pool, the final top detections are exactly those of
   the full set. Otherwise (rare: heavy suppression) the pool grows and the step is repeated.
   When no (image, class) has more than `topk_candidates` boxes above the threshold (the usual case
   at deployment thresholds such as 0.3), step 1 keeps every box above it: those are gathered as a
   list and sorted per image instead of running top-k over every (image, class, box), the same
   candidates for a fraction of the work. Otherwise steps 1-2 start as one top-k per image over every
   (box, class) pair, which is step 2's pool whenever no class holds more than `topk_candidates` of
   it (each pair in it is then within its class's top k); only if some class does, step 1 runs;
3. NMS within each (image, class) group (`grouped_nms`, shared with `ssd_core.export`): one call for
   the batch on GPU, one call per image on CPU, where the kernel's cost grows with (kept x candidates);
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
    exporting = torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    scores = F.softmax(cls_logits.float(), dim=-1)  # [B, A, C]
    candidates = None if exporting else SparseCandidates.gather(scores, config)
    if candidates is None:
        candidates = (DenseCandidates(*class_topk(scores, config), config.score_thresh) if exporting
                      else PairCandidates(scores, config))
    pool = min(config.pool_size, candidates.total)
    while True:
        pool_scores, pool_label, pool_anchor = candidates.pool(pool)
        result, kept_per_image = _select(
            pool_scores, pool_label, pool_anchor, bbox_regression, anchors, image_size, config, box_weights,
            num_classes=cls_logits.shape[-1],
        )
        if exporting or pool >= candidates.total:
            break
        starved = (kept_per_image < config.detections_per_img) & (candidates.num_valid > pool)
        if not bool(starved.any()):
            break
        pool = min(pool * 4, candidates.total)

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
    return class_topk(F.softmax(cls_logits.float(), dim=-1), config)


def class_topk(scores: Tensor, config: PostProcessConfig) -> tuple[Tensor, Tensor, int]:
    """`class_candidates` from softmax scores [B, A, C]."""
    scores = scores[..., 1:]  # [B, A, C-1], background dropped
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
    pool_scores, pool_label, pool_anchor = DenseCandidates(top_scores, top_anchor, k, -1.0).pool(pool)
    return pool_scores, pool_label, decode_pool(pool_anchor, bbox_regression, anchors, image_size, box_weights)


def decode_pool(pool_anchor: Tensor, bbox_regression: Tensor, anchors: Tensor, image_size: tuple[int, int],
                box_weights: tuple[float, float, float, float]) -> Tensor:
    """Boxes [B, P, 4] in input pixels, decoded and clipped, of the default boxes `pool_anchor` [B, P]."""
    rel = torch.gather(bbox_regression.float(), 1, pool_anchor.unsqueeze(-1).expand(-1, -1, 4))  # [B, P, 4]
    return clip_to_size(decode(rel, anchors[pool_anchor], box_weights), image_size)


class DenseCandidates:
    """Step 1's output as fixed-size tensors (see `class_candidates`); traceable for export."""

    def __init__(self, top_scores: Tensor, top_anchor: Tensor, k: int, score_thresh: float) -> None:
        self.top_scores, self.top_anchor, self.k = top_scores, top_anchor, k  # [B, (C-1)*k] each
        self.total = top_scores.shape[1]
        self.num_valid = (top_scores > score_thresh).sum(dim=1)  # [B]

    def pool(self, pool: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per image the `pool` best: scores [B, P] (-1 padding), labels [B, P] (1-based), default boxes [B, P]."""
        pool_scores, pool_pos = self.top_scores.topk(pool, dim=1)  # [B, P]
        pool_anchor = torch.gather(self.top_anchor, 1, pool_pos)  # [B, P]
        pool_label = torch.div(pool_pos, self.k, rounding_mode="floor") + 1  # [B, P]
        return pool_scores, pool_label, pool_anchor


class SparseCandidates:
    """Step 1 when no (image, class) has more than `topk_candidates` boxes above the threshold: then
    every box above it is a candidate, gathered as a list and sorted per image by descending score."""

    # Above this many candidates per image the dense top-k path is cheaper than sorting them all.
    MAX_PER_IMAGE = 8000

    def __init__(self, image: Tensor, anchor: Tensor, label: Tensor, score: Tensor, batch: int) -> None:
        # image, anchor, label (1-based), score: [n], sorted by (image, descending score).
        self.image, self.anchor, self.label, self.score, self.batch = image, anchor, label, score, batch
        self.num_valid = torch.bincount(image, minlength=batch)  # [B]
        self.total = int(self.num_valid.max()) if image.numel() else 0
        first = torch.cumsum(self.num_valid, 0) - self.num_valid  # [B] where each image's run starts
        self.rank = torch.arange(image.numel(), device=image.device) - first[image]  # [n] rank in its image

    @classmethod
    def gather(cls, scores: Tensor, config: PostProcessConfig) -> SparseCandidates | None:
        """The sparse candidates of softmax `scores` [B, A, C], or None where the dense path is needed."""
        batch, num_anchors, num_classes = scores.shape
        above = scores > config.score_thresh  # [B, A, C]
        above[..., 0] = False  # background is never a detection
        count = int(torch.count_nonzero(above))
        if count > cls.MAX_PER_IMAGE * batch:
            return None
        image, anchor, label = above.nonzero(as_tuple=True)  # [n] each; label 1-based like the classes
        if count > min(config.topk_candidates, num_anchors):
            per_class = torch.bincount(image * num_classes + label, minlength=batch * num_classes)
            if int(per_class.max()) > min(config.topk_candidates, num_anchors):
                return None  # some class has more boxes above the threshold than step 1 keeps
        score = scores[image, anchor, label]
        # Images never interleave: key in [2*image - 1, 2*image); float64 keeps scores' order exact.
        order = torch.sort(image.double() * 2 - score.double(), stable=True).indices
        return cls(image[order], anchor[order], label[order], score[order], batch)

    def pool(self, pool: int) -> tuple[Tensor, Tensor, Tensor]:
        """Same contract as `DenseCandidates.pool`."""
        width = max(1, min(pool, self.total))
        scores = self.score.new_full((self.batch, width), -1.0)
        labels = self.label.new_ones((self.batch, width))
        anchors = self.anchor.new_zeros((self.batch, width))
        inside = self.rank < width
        where = (self.image[inside], self.rank[inside])
        scores[where], labels[where], anchors[where] = self.score[inside], self.label[inside], self.anchor[inside]
        return scores, labels, anchors


class PairCandidates:
    """Steps 1-2 as one top-k per image over every (default box, class) pair, for many candidates (low
    thresholds, as in evaluation): about 5x cheaper than a top-k per (image, class). If some class holds
    more than `topk_candidates` of a pool's valid pairs, step 1 would have dropped some of them: that pool
    and later ones come from `DenseCandidates` instead. Overwrites the background column of `scores`
    (softmax [B, A, C], postprocess's own)."""

    def __init__(self, scores: Tensor, config: PostProcessConfig) -> None:
        batch, num_anchors, num_classes = scores.shape
        scores[..., 0] = -1.0  # background is never a detection
        self.scores, self.config = scores, config
        self.k = min(config.topk_candidates, num_anchors)
        self.total = num_anchors * (num_classes - 1)
        self._num_valid: Tensor | None = None
        self._dense: DenseCandidates | None = None

    @property
    def num_valid(self) -> Tensor:
        """[B] candidates above the threshold after step 1's per-class cap (as `DenseCandidates` counts)."""
        if self._num_valid is None:
            # int32 sums over the contiguous mask: ~5x faster than int64 over a strided class slice.
            above = (self.scores > self.config.score_thresh).sum(dim=1, dtype=torch.int32)[:, 1:]  # [B, C-1]
            self._num_valid = above.clamp(max=self.k).sum(dim=1)
        return self._num_valid

    def pool(self, pool: int) -> tuple[Tensor, Tensor, Tensor]:
        """Same contract as `DenseCandidates.pool`."""
        if self._dense is None:
            batch, _, num_classes = self.scores.shape
            pool_scores, position = self.scores.flatten(1).topk(pool, dim=1)  # [B, P]
            pool_anchor = torch.div(position, num_classes, rounding_mode="floor")
            pool_label = position % num_classes  # background (0) holds -1, so labels are 1..C-1 where valid
            valid = pool_scores > self.config.score_thresh
            image = torch.arange(batch, device=position.device)[:, None].expand_as(position)
            per_class = torch.bincount((image * num_classes + pool_label)[valid], minlength=batch * num_classes)
            if int(per_class.max()) <= self.k:
                return pool_scores, pool_label, pool_anchor
            self._dense = DenseCandidates(*class_topk(self.scores, self.config), self.config.score_thresh)
        return self._dense.pool(min(pool, self._dense.total))


def _select(pool_scores, pool_label, pool_anchor, bbox_regression, anchors, image_size, config, box_weights, *,
            num_classes: int):
    """Steps 3-4 on one pool of candidates per image (scores, labels, default boxes: [B, P])."""
    batch = pool_scores.shape[0]
    device = pool_scores.device
    boxes = decode_pool(pool_anchor, bbox_regression, anchors, image_size, box_weights)

    valid = pool_scores > config.score_thresh  # [B, P]
    image_index = torch.arange(batch, device=device)[:, None].expand_as(pool_label)[valid]  # [n]
    flat_boxes, flat_scores, flat_labels = boxes[valid], pool_scores[valid], pool_label[valid]
    group = image_index * num_classes + flat_labels
    segments = None
    if device.type == "cpu" and batch > 1 and not torch.jit.is_tracing():
        # The CPU kernel compares every kept box with every later candidate, so one call over the
        # batch costs O(batch^2); one call per image (candidates are image-major) stays linear.
        segments = valid.sum(dim=1).tolist()
    keep = grouped_nms(flat_boxes, flat_scores, group, config.nms_thresh, image_size, segments=segments)

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


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, image_size: tuple[int, int],
                *, segments: list[int] | None = None) -> Tensor:
    """NMS within each group only: indices into `boxes` [n, 4] (xyxy, inside `image_size` (H, W)) of the
    kept boxes by descending score, for `scores` [n] and int64 `groups` [n].

    Each group is moved into its own coordinate range, larger than any box (torchvision's
    `batched_nms` trick), so that groups never suppress each other and one `nms` call does all of them;
    traceable. `segments` (sizes of consecutive runs that share no group, e.g. one per image) runs one
    call per run instead, indices image-major.
    """
    offset = float(max(image_size) + 1)
    shifted = boxes + (groups * offset)[:, None].to(boxes)
    if segments is None:
        return nms(shifted, scores, iou_threshold)
    starts = [0, *itertools.accumulate(segments)][:-1]
    return torch.cat([
        nms(part, part_scores, iou_threshold) + start
        for part, part_scores, start in zip(shifted.split(segments), scores.split(segments), starts)
    ])
