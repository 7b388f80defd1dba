"""Post-training int8 quantization for CPU inference, with PyTorch's FX graph mode and its x86 backend.

What is quantized: backbone and head, traced as one graph (`Network`). Convolutions (BatchNorm folded,
ReLU fused), ReLU6, Hardswish, additions, the SE blocks' pooling and multiplications run in int8, with
per-channel symmetric int8 weights and per-tensor uint8 activations whose ranges are calibrated on
training images (histogram observer: the range that minimises the quantization error). Kept in fp32:
the input until its quantization; each predictor's output from its last convolution on (dequantized
with its own scale, then laid out and concatenated across feature maps), anchors, box decoding, NMS and
rescaling; and in SSD300/512-VGG16 the L2 normalisation of conv4_3 with its learned per-channel scale
(one 8-bit scale for the 512 values of `scale_weight` would round them together).

A calibrated model carries `int8_state`, the quantized graph's state_dict (int8 weights, the
activations' scales and zero points); checkpoints store it beside the fp32 weights, and
`int8_network` rebuilds the same graph from the two (prepare, convert, load: no calibration run).
Everything here loads with `torch.load(weights_only=True)`.

FX graph mode is the part of `torch.ao.quantization` that runs eagerly on the x86 (fbgemm/oneDNN) kernels
without torch.compile; PyTorch marks it deprecated in favour of torchao's PT2E flow, so its warnings are
silenced here.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ssd_core.backbones.vgg import VGGExtractor
from ssd_core.model import SSD

log = logging.getLogger(__name__)

BACKEND = "x86"
INT8_FORMAT = "fx-x86-v1"  # how `int8_state` is laid out; checkpoints record it


class Network(nn.Module):
    """An SSD's backbone and head as one module to trace: batch [B, 3, H, W] -> (head outputs
    {"bbox_regression": [B, A, 4], "cls_logits": [B, A, K]}, the feature maps' (h, w) for the anchors)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Any]]:
        features = self.backbone(batch)
        return self.head(features), [f.shape[-2:] for f in features]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The deprecation notices of FX graph mode and quantized tensors, reduce_range's, and uncalibrated
    observers' warnings (the rebuild loads the calibrated values right after) are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _check_backend() -> None:
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8 inference needs PyTorch's {BACKEND} quantized engine (an x86-64 CPU); this build "
                         f"has {', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = BACKEND


def qconfig_mapping(model: SSD) -> Any:
    """The x86 backend's default: HistogramObserver on activations (uint8, 7-bit range so that CPUs
    without VNNI cannot overflow), per-channel symmetric int8 weights; the head's concatenation and
    VGG's scaled L2 norm in fp32."""
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(BACKEND)
    # The head's predictor outputs are dequantized (each keeps its own output scale) and laid out and
    # concatenated in fp32: an int8 cat would force one scale on maps whose ranges differ. `view` is
    # also VGG's scale_weight.view(1, -1, 1, 1) (no backbone quantizes a view).
    mapping.set_object_type("view", None)
    mapping.set_object_type(torch.cat, None)
    if isinstance(model.backbone, VGGExtractor):
        # scale_weight.view(...) * F.normalize(conv4_3), VGGExtractor.forward's first multiplication
        # (F.normalize has no int8 kernel: it runs in fp32 on the dequantized map).
        mapping.set_module_name_object_type_order("backbone", operator.mul, 0, None)
    return mapping


def _prepare(model: SSD) -> torch.fx.GraphModule:
    """The FX graph of `model`'s backbone and head (an fp32 copy in eval mode) with observers inserted."""
    import copy

    from torch.ao.quantization.quantize_fx import prepare_fx

    from ssd_core.backbones.mobilenet import plain_depthwise

    _check_backend()
    float_model = model.source_model if getattr(model, "inference_optimized", False) else model
    network = copy.deepcopy(Network(float_model.backbone, float_model.head)).eval().float().requires_grad_(False)
    plain_depthwise(network)  # training's fp32-under-autocast depthwise convolutions: plain ones to trace
    example = torch.zeros(1, 3, *model.size).contiguous(memory_format=torch.channels_last)
    with _quiet():
        return prepare_fx(network, qconfig_mapping(float_model), example_inputs=(example,))


def _convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(prepared)


def calibrate(model: SSD, batches: Iterable[Tensor]) -> int:
    """Observe `batches` (preprocessed, see `SSD.preprocess`), quantize, and set the result as
    `model.int8_state` (its fp32 weights are left as they are). Returns the number of images seen."""
    prepared = _prepare(model)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            prepared(batch.contiguous(memory_format=torch.channels_last))
            seen += len(batch)
    if seen == 0:
        raise ValueError("calibration needs at least one image")
    model.int8_state = {key: value.detach().cpu() for key, value in _convert(prepared).state_dict().items()}
    return seen


def int8_network(model: SSD) -> torch.fx.GraphModule:
    """The quantized backbone and head of a calibrated `model`, rebuilt from `model.int8_state`."""
    if model.int8_state is None:
        raise ValueError(f"precision 'int8' needs a calibrated model: run `ssd quantize --weights W --data DIR "
                         f"--output W_int8.pt` and load its output ({model.arch} has no int8 calibration)")
    prepared = _prepare(model)
    network = _convert(prepared)  # observers never ran: placeholder scales, replaced by the load below
    with _quiet():
        result = network.load_state_dict(model.int8_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the int8 calibration of this {model.arch} does not fit the graph PyTorch {torch.__version__} builds "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}): run `ssd quantize` again"
        )
    return network.eval()


class _Outputs(nn.Module):
    """The quantized graph with its head outputs in fp32 contiguous memory, as `SSD.forward_head` returns them."""

    def __init__(self, network: torch.fx.GraphModule) -> None:
        super().__init__()
        self.network = network

    def forward(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Any]]:
        head_outputs, grid = self.network(batch)
        return {k: v.float() for k, v in head_outputs.items()}, grid


def int8_module(model: SSD) -> nn.Module:
    """What `optimize_for_inference` puts in `SSD.int8_network`."""
    return _Outputs(int8_network(model))


# -- calibrating a checkpoint on a dataset ------------------------------------------------------------


def calibration_batches(model: SSD, data: str, *, num_images: int, batch_size: int, workers: int = 1,
                        seed: int = 0) -> Iterator[Tensor]:
    """`num_images` training images of the dataset at `data` (a seeded sample across the split), read
    and preprocessed exactly as inference does (`SSD.preprocess`), in batches."""
    from torch.utils.data import Subset

    from ssd_core.data import CocoDataset, make_loader

    dataset = CocoDataset(data, split="train")
    if len(dataset) == 0:
        raise ValueError(f"{data}: the train split has no images to calibrate on")
    count = min(num_images, len(dataset))
    indices = sorted(random.Random(seed).sample(range(len(dataset)), count))
    loader = make_loader(Subset(dataset, indices), batch_size, shuffle=False, workers=workers, seed=seed)
    with torch.no_grad():
        for images, _ in loader:
            batch, _ = model.preprocess(list(images))
            yield batch


MAX_AP_LOSS = 1.0  # AP / AP50 points int8 may lose against fp32 on the check before `ssd quantize` refuses


def check_accuracy(model: SSD, data: str, *, num_images: int, batch_size: int = 8,
                   workers: int = 1) -> dict[str, Any] | None:
    """COCO AP and AP50 (0-100) of a calibrated `model` in fp32 and in int8 on the first `num_images`
    images of `data`'s val split, or None when the dataset has no val split."""
    from ssd_core.data import CocoDataset
    from ssd_core.evaluation import evaluate_model
    from ssd_core.inference import optimize_for_inference

    try:
        dataset = CocoDataset(data, split="val")
    except FileNotFoundError:
        log.warning("%s has no val split: int8 accuracy not checked", data)
        return None
    check: dict[str, Any] = {"images": min(num_images, len(dataset))}
    for precision in ("fp32", "int8"):
        metrics = evaluate_model(optimize_for_inference(model, precision), dataset, batch_size=batch_size,
                                 workers=workers, progress=False, max_images=num_images)
        check[precision] = {key: round(100 * max(metrics[key] or 0.0, 0.0), 2) for key in ("AP", "AP50")}
    check["loss"] = {key: round(check["fp32"][key] - check["int8"][key], 2) for key in ("AP", "AP50")}
    return check


def quantize_checkpoint(
    weights: str, output: str, *, data: str, arch: str | None = None, num_images: int = 128,
    batch_size: int = 8, workers: int = 1, seed: int = 0, check_images: int = 100, max_ap_loss: float = MAX_AP_LOSS,
) -> dict[str, Any]:
    """Calibrate `weights` (our checkpoint, or with `arch` torchvision's / NVIDIA's) on `num_images` of
    `data`'s training images and write an int8 checkpoint to `output` (local or s3://) that
    `load_model` / `build_model` load like any other. With `check_images`, fp32 and int8 are evaluated on
    that many val images first (`check_accuracy`, recorded in the checkpoint): when int8 loses more than
    `max_ap_loss` AP or AP50 points, nothing is written (ValueError). Returns a summary."""
    from ssd_core.checkpoint import write_checkpoint
    from ssd_core.zoo import build_model, checkpoint_payload, load_model

    if num_images < 1:
        raise ValueError(f"--calibration-images must be >= 1, got {num_images}")
    if check_images < 0:
        raise ValueError(f"--check-images must be >= 0, got {check_images}")
    model = build_model(arch, weights=weights, precision="fp32") if arch else load_model(weights, precision="fp32")
    model.int8_state = None  # re-calibrating an int8 checkpoint starts from its fp32 weights
    started = time.perf_counter()
    seen = calibrate(model, calibration_batches(model, data, num_images=num_images, batch_size=batch_size,
                                                workers=workers, seed=seed))
    seconds = time.perf_counter() - started
    check = check_accuracy(model, data, num_images=check_images, batch_size=batch_size,
                           workers=workers) if check_images else None
    if check is not None:
        log.info("on %d val images: fp32 AP %.2f AP50 %.2f, int8 AP %.2f AP50 %.2f", check["images"],
                 check["fp32"]["AP"], check["fp32"]["AP50"], check["int8"]["AP"], check["int8"]["AP50"])
        if max(check["loss"].values()) > max_ap_loss:
            raise ValueError(
                f"int8 loses {check['loss']['AP']:.2f} AP / {check['loss']['AP50']:.2f} AP50 points against fp32 on "
                f"{check['images']} val images of {data} (more than --max-ap-loss {max_ap_loss:g}): {output} not "
                f"written; run this model in bf16 (--precision bf16), or pass --max-ap-loss to write it anyway")
    payload = checkpoint_payload(model)
    payload["int8"]["calibration"] = {"data": str(data), "images": seen, "seed": seed, "weights": str(weights)}
    if check is not None:
        payload["int8"]["check"] = check
    write_checkpoint(output, payload)
    log.info("int8 checkpoint %s: %s calibrated on %d images of %s in %.1f s", output, model.arch, seen, data, seconds)
    summary = {"output": output, "arch": model.arch, "calibration_images": seen, "seconds": round(seconds, 1),
               "precision": "int8"}
    if check is not None:
        summary["check"] = check
    return summary
