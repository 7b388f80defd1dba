"""The SSD detector: transform -> backbone -> head -> loss (training) | post-processing (eval).

It behaves like torchvision's detection models. In eval mode
`model(images)` takes a list of FloatTensor[3, H, W] in 0..1 of any sizes and returns, per image,
{"boxes": FloatTensor[N, 4] xyxy in original pixels, "labels": Int64Tensor[N], "scores": FloatTensor[N]}.
In training mode `model(images, targets)` with targets [{"boxes": FloatTensor[N, 4] xyxy pixels,
"labels": Int64Tensor[N]}] returns {"bbox_regression": loss, "classification": loss}. Label 0 is
background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd_core.anchors import DefaultBoxes
from ssd_core.boxes import scale_boxes
from ssd_core.losses import multibox_loss
from ssd_core.matching import match_anchors, pad_targets
from ssd_core.postprocess import PostProcessConfig, postprocess
from ssd_core.precision import autocast, resolve_precision


def validate_images(images: Sequence[Tensor]) -> None:
    """ValueError naming the first image that is not a 3-channel float tensor (finiteness is
    checked in `preprocess_images`)."""
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    if len(images) == 0:
        raise ValueError("expected a non-empty list of images")
    for index, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"image {index}: expected a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {index}: expected shape [3, H, W], got {list(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"image {index}: expected a float tensor in 0..1, got {image.dtype}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {index}: empty image of shape {list(image.shape)}")


def validate_targets(targets: Sequence[dict[str, Tensor]], num_classes: int, num_images: int) -> None:
    """ValueError naming the image and box of the first malformed target."""
    if len(targets) != num_images:
        raise ValueError(f"got {len(targets)} targets for {num_images} images")
    for index, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or not isinstance(labels, Tensor):
            raise ValueError(f"image {index}: target needs 'boxes' and 'labels' tensors")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"image {index}: boxes must be [N, 4], got {list(boxes.shape)}")
        if labels.shape != boxes.shape[:1]:
            raise ValueError(f"image {index}: {labels.shape[0]} labels for {boxes.shape[0]} boxes")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"image {index}: boxes contain NaN or Inf")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            j = int(degenerate.nonzero()[0])
            raise ValueError(
                f"image {index}: box {j} {boxes[j].tolist()} has x2 <= x1 or y2 <= y1 (boxes are xyxy)"
            )
        out_of_range = (labels < 1) | (labels >= num_classes)
        if out_of_range.any():
            j = int(out_of_range.nonzero()[0])
            raise ValueError(f"image {index}: label {int(labels[j])} of box {j} is outside 1..{num_classes - 1}")


def resize_normalize(
    image: Tensor, size: tuple[int, int], mean: Tensor, std: Tensor, *, normalize_first: bool = True
) -> Tensor:
    """FloatTensor[3, H, W] (any memory layout) -> (x - mean) / std resized (bilinear) to [3, *size].

    One image at a time, on the image's own memory layout: a [3, H, W] view of HWC pixels resizes as
    channels_last with no transposing copy, and the working set stays a few MB (stacking a batch of
    640x480 images first costs ~60 MB of fresh memory per call, more time than the resizes).
    ``normalize_first`` keeps torchvision's order (normalise, then resize), bit for bit; False resizes first,
    normalising a third as many pixels for 640x480 -> 320x320 (bilinear weights sum to one, so only float
    rounding changes, ~1e-6): bulk detection's choice, where throughput counts.
    """
    mean = mean.to(device=image.device, dtype=image.dtype)[:, None, None]
    std = std.to(device=image.device, dtype=image.dtype)[:, None, None]
    if normalize_first:
        image = image.sub(mean).div_(std)
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image[None], size=list(size), mode="bilinear", align_corners=False)[0]
    if not normalize_first:
        image = image.sub(mean).div_(std)
    return image


def preprocess_images(
    images: Sequence[Tensor], size: tuple[int, int], mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    """Resize (bilinear) and normalise a list of float [3, H, W] images to a batch [B, 3, *size].

    Returns the batch and the original sizes LongTensor[B, 2] (H, W). ValueError names an image holding
    NaN or Inf.
    """
    # A NaN or Inf makes an image's sum non-finite; summing is ~40x cheaper than isfinite() over every
    # pixel, and one check for the batch is one device sync. Only suspects get the exact check.
    sums = torch.stack([image.sum() for image in images])
    for j in (~torch.isfinite(sums)).nonzero().flatten().tolist():
        if not bool(torch.isfinite(images[j]).all()):
            raise ValueError(f"image {j}: contains NaN or Inf")
    batch = torch.empty((len(images), 3, *size), dtype=images[0].dtype, device=images[0].device)
    for index, image in enumerate(images):
        batch[index] = resize_normalize(image, size, mean, std)
    original = torch.tensor([image.shape[-2:] for image in images], dtype=torch.int64)
    return batch, original


class SSD(nn.Module):
    """Single Shot MultiBox Detector assembled from its parts.

    backbone: module returning a list of feature maps (and listing `out_channels`);
    default_boxes: the tiling over those maps; head: {"cls_logits", "bbox_regression"} per box.
    `size` (H, W) is the fixed input; `image_mean` / `image_std` normalise 0..1 pixels for the
    backbone. `precision` (fp32 | bf16 | fp16 | int8 | auto) is what forward runs in (autocast); losses and
    post-processing always run in fp32. For fast inference see `ssd_core.inference.optimize_for_inference`.
    int8 needs a calibration (`int8_state`, from `ssd_core.quantize`) and runs only in the copy
    `optimize_for_inference` makes, where `int8_network` holds backbone and head as one quantized graph.
    """

    def __init__(
        self,
        backbone: nn.Module,
        default_boxes: DefaultBoxes,
        head: nn.Module,
        *,
        size: tuple[int, int],
        num_classes: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        iou_threshold: float = 0.5,
        neg_to_pos_ratio: float = 3.0,
        postprocess_config: PostProcessConfig | None = None,
        precision: str = "fp32",
        arch: str = "custom",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.default_boxes = default_boxes
        self.head = head
        self.size = tuple(size)
        self.num_classes = num_classes
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32), persistent=False)
        self.box_weights = tuple(box_weights)
        self.iou_threshold = iou_threshold
        self.neg_to_pos_ratio = neg_to_pos_ratio
        self.postprocess_config = postprocess_config or PostProcessConfig()
        self.arch = arch
        if class_names is None:
            class_names = ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = list(class_names)
        self.int8_state: dict[str, Tensor] | None = None  # the int8 network's state (ssd_core.quantize)
        self.int8_network: nn.Module | None = None  # set in optimize_for_inference's int8 copy only
        self.precision = "fp32"
        self.set_precision(precision)

    # -- precision -----------------------------------------------------------------------------
    def set_precision(self, precision: str) -> SSD:
        """Run forward in `precision`; bf16/fp16 also switch to channels_last, where they are fastest."""
        resolve_precision(precision, "cuda" if precision == "fp16" else "cpu")  # validates the name
        self.precision = precision
        memory_format = torch.contiguous_format if precision == "fp32" else torch.channels_last
        self.to(memory_format=memory_format)
        return self

    def effective_precision(self, device: torch.device | str) -> str:
        """The concrete precision on `device`; "auto" picks int8 on CPU for a model calibrated for it."""
        if self.precision == "auto" and self.int8_state is not None and torch.device(device).type == "cpu":
            return "int8"
        return resolve_precision(self.precision, device)

    # -- stages --------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Validated, normalised and resized batch [B, 3, H, W] plus original sizes [B, 2]."""
        validate_images(images)
        return preprocess_images(list(images), self.size, self.image_mean, self.image_std)

    def anchors(self, features: list[Tensor]) -> Tensor:
        """Default boxes [A, 4] xyxy in input pixels for these feature maps."""
        grid = [tuple(f.shape[-2:]) for f in features]
        return self.default_boxes.xyxy(grid, self.size, device=features[0].device)

    def forward_head(self, batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Backbone and head on a preprocessed batch: raw head outputs (fp32) and the anchors."""
        precision = self.effective_precision(batch.device)
        if precision not in ("fp32", "int8"):  # int8: the compiled graph takes NCHW (see CompiledInt8)
            batch = batch.contiguous(memory_format=torch.channels_last)
        if precision == "int8":
            if self.int8_network is None:
                raise ValueError("an int8 model runs through ssd_core.inference.optimize_for_inference(model)")
            head_outputs, grid = self.int8_network(batch)  # fp32 outputs, the feature maps' sizes
            anchors = self.default_boxes.xyxy([tuple(g) for g in grid], self.size, device=batch.device)
            return head_outputs, anchors
        with autocast(precision, batch.device):
            features = self.backbone(batch)
            head_outputs = self.head(features)
        head_outputs = {k: v.float() for k, v in head_outputs.items()}
        return head_outputs, self.anchors(features)

    def detect(self, batch: Tensor, original_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections for a preprocessed batch (see `preprocess`), boxes in original pixels."""
        head_outputs, anchors = self.forward_head(batch)
        return postprocess(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, self.size,
            original_sizes.to(batch.device), self.postprocess_config, self.box_weights,
        )

    def compute_loss(
        self, head_outputs: dict[str, Tensor], anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor
    ) -> dict[str, Tensor]:
        """Multibox loss for padded targets (see `pad_targets`) in input pixels."""
        matches = match_anchors(gt_boxes, gt_valid, anchors, self.iou_threshold)
        return multibox_loss(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, gt_boxes, gt_labels, matches,
            box_weights=self.box_weights, neg_to_pos_ratio=self.neg_to_pos_ratio,
        )

    def forward(
        self, images: Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets")
        batch, original_sizes = self.preprocess(images)
        if targets is None:
            return self.detect(batch, original_sizes)
        validate_targets(targets, self.num_classes, len(images))
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, batch.device)
        # Targets follow their image into the resized input.
        ratio = torch.tensor(self.size, dtype=torch.float32) / original_sizes.to(torch.float32)  # [B, 2] (sy, sx)
        gt_boxes = scale_boxes(gt_boxes, ratio.flip(-1).to(batch.device)[:, None, :])  # [B, G, 4]
        head_outputs, anchors = self.forward_head(batch)
        return self.compute_loss(head_outputs, anchors, gt_boxes, gt_labels, gt_valid)
