"""Export the whole inference path (normalisation, network, box decoding, NMS) to ONNX or TorchScript.

Input contract of the exported graph (one input, ``images``):
    FloatTensor[B, 3, H, W], RGB, values in 0..1, already resized to the model's input size
    ``(H, W) = model.size`` (e.g. 300x300 for ssd300_vgg16, 320x320 for ssdlite320). B is dynamic.
    Mean/std normalisation happens inside the graph.

Outputs (fixed D = the model's ``detections_per_img``, padded, best first):
    ``boxes``          FloatTensor[B, D, 4] xyxy in input pixels (multiply x by W_orig / W and y by
                       H_orig / H to get back to the original image)
    ``scores``         FloatTensor[B, D] (0 in padding rows)
    ``labels``         Int64Tensor[B, D] contiguous class indices, 0 (background) in padding rows
    ``num_detections`` Int64Tensor[B]: rows ``[:num_detections[b]]`` of image b are real detections

The post-processing is the same as ``ssd_core.postprocess`` (per-class top-k above the score
threshold, a per-image candidate pool, one batched NMS, per-image cap) with one difference: the
eager code's exact fallback, which grows the candidate pool when heavy suppression leaves fewer than
``detections_per_img`` boxes in it, is a data-dependent loop and is skipped in the exported graph.
With the default pool (1000 candidates per image) this only matters for images whose top 1000
candidates collapse under NMS to fewer than D boxes while more candidates exist.

ONNX: exported with the TorchScript-based exporter (``dynamo=False``), opset >= 11 for
``NonMaxSuppression``; run it with onnxruntime. TorchScript: a traced module; ``import torchvision``
before ``torch.jit.load`` so the ``torchvision::nms`` operator is registered.
The exported graph always runs in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ssd_core.model import SSD
from ssd_core.postprocess import PostProcessConfig, class_candidates, grouped_nms, pool_candidates

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
DEFAULT_OPSET = 17
MIN_OPSET = 11  # first opset with NonMaxSuppression


class ExportableSSD(nn.Module):
    """An SSD's inference path with fixed-shape outputs, written to trace: no Python branches on data.

    forward(images FloatTensor[B, 3, H, W] in 0..1 at ``model.size``) ->
    (boxes [B, D, 4] input pixels, scores [B, D], labels int64 [B, D], num_detections int64 [B]).
    The wrapped model is copied and put in fp32 / eval mode; the caller's model is left untouched.
    """

    def __init__(self, model: SSD, postprocess_config: PostProcessConfig | None = None) -> None:
        super().__init__()
        model = copy.deepcopy(model).set_precision("fp32").float().eval()
        self.backbone = model.backbone
        self.head = model.head
        self.size = tuple(model.size)
        self.box_weights = tuple(model.box_weights)
        self.config = postprocess_config or replace(model.postprocess_config)
        self.register_buffer("image_mean", model.image_mean.float().view(1, 3, 1, 1).clone())
        self.register_buffer("image_std", model.image_std.float().view(1, 3, 1, 1).clone())
        # The input size is fixed, so the default boxes are constants of the graph.
        with torch.no_grad():
            _, anchors = model.forward_head(torch.zeros(1, 3, *self.size))
        self.register_buffer("anchors", anchors.float())  # [A, 4] xyxy input pixels

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch = (images - self.image_mean) / self.image_std
        head_outputs = self.head(self.backbone(batch))
        return padded_postprocess(
            head_outputs["cls_logits"].float(), head_outputs["bbox_regression"].float(), self.anchors,
            self.size, self.config, self.box_weights,
        )


def padded_postprocess(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_size: tuple[int, int],
    config: PostProcessConfig,
    box_weights: tuple[float, float, float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ssd_core.postprocess`` (first pass only) with padded outputs, in traceable ops.

    cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4] -> boxes [B, D, 4] (input
    pixels), scores [B, D], labels int64 [B, D], num_detections int64 [B]; D = min(detections_per_img, pool).
    """
    top_scores, top_anchor, k = class_candidates(cls_logits, config)
    num_classes = cls_logits.shape[-1]
    pool = min(config.pool_size, top_scores.shape[1])
    pool_scores, pool_label, boxes = pool_candidates(
        top_scores, top_anchor, k, pool, bbox_regression, anchors, image_size, box_weights
    )

    # One NMS for the whole batch, within each (image, class) group.
    image_index = torch.arange(pool_scores.shape[0], device=pool_scores.device).unsqueeze(1)  # [B, 1]
    group = (image_index * num_classes + pool_label).flatten()  # [B*P]
    flat_boxes = boxes.flatten(0, 1)  # [B*P, 4]
    flat_scores = pool_scores.flatten()
    candidates = torch.nonzero(flat_scores > config.score_thresh).squeeze(1)  # [n]
    keep = candidates[grouped_nms(flat_boxes[candidates], flat_scores[candidates], group[candidates],
                                  config.nms_thresh, image_size)]

    # Survivors keep their score, everything else drops below any real score; the per-image top D
    # of that is the padded result (already sorted best first).
    ranked = torch.full_like(flat_scores, -1.0).scatter(0, keep, flat_scores[keep]).reshape_as(pool_scores)
    detections = min(config.detections_per_img, pool)
    out_scores, out_pos = ranked.topk(detections, dim=1)  # [B, D]
    real = out_scores > config.score_thresh  # [B, D]
    out_boxes = torch.gather(boxes, 1, out_pos.unsqueeze(-1).expand(-1, -1, 4)) * real.unsqueeze(-1)
    out_labels = torch.gather(pool_label, 1, out_pos) * real
    return out_boxes, out_scores * real, out_labels, real.sum(dim=1)


@contextlib.contextmanager
def _quiet_tracer():
    """Tracing warns that shapes become constants; here they are (anchors, classes and the
    candidate pool are fixed by the architecture), and the batch size stays dynamic (tested).
    torch.jit.trace and the TorchScript-based ONNX exporter are deprecated upstream but are what
    maps torchvision's NMS onto ONNX NonMaxSuppression; their deprecation notices are not for users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*(torch\.jit\.trace|legacy TorchScript-based ONNX)")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} has no NonMaxSuppression; use --opset {MIN_OPSET} or newer")


def export_onnx(model: SSD, output: str | Path, *, opset: int = DEFAULT_OPSET, example_batch: int = 1) -> Path:
    """Write ``model``'s inference path (module docstring contract) as an ONNX file with a dynamic batch."""
    _check_opset(opset)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableSSD(model)
    example = torch.rand(example_batch, 3, *wrapper.size)
    dynamic_axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with torch.no_grad(), _quiet_tracer():
        # The TorchScript-based exporter maps torchvision.ops.nms onto ONNX NonMaxSuppression.
        torch.onnx.export(
            wrapper, (example,), str(output), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic_axes,
        )
    return output


def export_torchscript(model: SSD, output: str | Path, *, example_batch: int = 1) -> Path:
    """Write ``model``'s inference path as a traced TorchScript file (load with ``torch.jit.load``
    after ``import torchvision``)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableSSD(model)
    example = torch.rand(example_batch, 3, *wrapper.size)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    traced.save(str(output))
    return output


def export_model(model: SSD, output: str | Path, *, format: str = "onnx", opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` to ``output`` in ``format`` ("onnx" | "torchscript")."""
    if format == "onnx":
        return export_onnx(model, output, opset=opset)
    if format == "torchscript":
        return export_torchscript(model, output)
    raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
