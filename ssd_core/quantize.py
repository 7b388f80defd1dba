"""Post-training int8 quantization for CPU inference: PyTorch's PT2E flow (torchao) with the x86 inductor
quantizer, compiled by torch.compile into oneDNN's int8 kernels.

What is quantized: backbone and head, exported as one graph (`Network`). Every convolution (BatchNorm
folded) takes uint8 activations and per-channel symmetric int8 weights; activations' ranges are
calibrated on training images (histogram observer: the range that minimises the quantization error),
with the full 8-bit range (VNNI CPUs; see docs/guide.md). torch.compile fuses each convolution with what
follows it (ReLU, ReLU6, Hardswish, the residual addition, the next quantization) into one oneDNN call,
which is where int8 gains on MobileNet's many small layers. Kept in fp32: the input until its
quantization, every predictor's output (an int8 convolution with a float output, laid out and
concatenated in fp32), anchors, box decoding, NMS and rescaling; in SSD300/512-VGG16 the L2 normalisation
of conv4_3 with its learned scale, and the ceil-mode pool3 (inductor's int8 max-pool rounds its output
size down).

A calibrated model carries `int8_state`, its observers' state (histograms and ranges, a few MB); checkpoints
store it beside the fp32 weights, and `int8_graph` rebuilds the same graph from the two (export,
prepare, load, convert: no calibration run). Everything here loads with `torch.load(weights_only=True)`.
The network is compiled on its first call, for that call's batch size (~10 s for SSDLite320 on two cores;
inductor's graph cache skips graphs holding oneDNN's prepacked weights, so each process compiles); smaller
batches are padded to it and larger ones sliced, so a process compiles once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ssd_core.model import SSD

log = logging.getLogger(__name__)

BACKEND = "x86"
INT8_FORMAT = "pt2e-x86-inductor-v1"  # how `int8_state` is laid out; checkpoints record it
OBSERVER = "activation_post_process"  # PT2E's name for the observers it inserts


class Network(nn.Module):
    """An SSD's backbone and head as one module to export: batch [B, 3, H, W] -> (head outputs
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
    """torchao's import notice (an Enum registered with torch's pytree), the compiler's "no CUDA runtime"
    on CPU nodes, and export's / the observers' warnings (uncalibrated observers before the rebuild loads
    their state) are noise here."""
    loggers = [logging.getLogger(name) for name in ("torch.utils._pytree", "torch.utils.cpp_extension")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torch(ao)?\.")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_backend() -> None:
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8 inference needs PyTorch's {BACKEND} quantized engine (an x86-64 CPU); this build "
                         f"has {', '.join(torch.backends.quantized.supported_engines)}")


def quantizer(network: nn.Module) -> Any:
    """The x86 inductor quantizer's default (uint8 activations over 8 bits, per-channel int8 weights),
    without the max-pools in ceil mode (VGG's pool3), which stay fp32."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    chosen = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    for name, module in network.named_modules():
        if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
            chosen.set_module_name_qconfig(name, None)
    return chosen


def _prepare(model: SSD) -> torch.fx.GraphModule:
    """The exported graph of `model`'s backbone and head (an fp32 copy in eval mode, any batch size)
    with observers inserted."""
    _check_backend()
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        float_model = model.source_model if getattr(model, "inference_optimized", False) else model
        network = copy.deepcopy(Network(float_model.backbone, float_model.head)).eval().float().requires_grad_(False)
        from ssd_core.backbones.mobilenet import plain_depthwise

        plain_depthwise(network)  # training's fp32-under-autocast depthwise convolutions: plain ones to export
        example = torch.zeros(2, 3, *model.size).contiguous(memory_format=torch.channels_last)
        exported = torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                       strict=False).module()
        _one_partition_per_activation_call(exported)
        return prepare_pt2e(exported, quantizer(network))


def _one_partition_per_activation_call(graph: torch.fx.GraphModule) -> None:
    """torchvision's Bottleneck calls its one ReLU module three times; the quantizer groups a graph's nodes
    into patterns by the module they came from (`nn_module_stack`), so the three calls would form one
    partition with three outputs, which it refuses. An activation module is one node per call: each call
    gets its own module path. (A dynamo export names each call apart too, but takes 3x as long.)"""
    activations = (nn.ReLU, nn.ReLU6, nn.Hardswish)
    names = {f"{kind.__module__}.{kind.__qualname__}" for kind in activations}  # the type, or its name
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, kind) = next(reversed(stack.items()))
        if kind in names or (isinstance(kind, type) and issubclass(kind, activations)):
            stack[key] = (f"{path}@{node.name}", kind)


def _observer_state(prepared: torch.fx.GraphModule) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in prepared.state_dict().items() if key.startswith(OBSERVER)}


def calibrate(model: SSD, batches: Iterable[Tensor]) -> int:
    """Observe `batches` (preprocessed, see `SSD.preprocess`) and set the observers' state as
    `model.int8_state` (its fp32 weights are left as they are). Returns the number of images seen."""
    prepared = _prepare(model)
    seen = 0
    with torch.no_grad(), _quiet():
        for batch in batches:
            prepared(batch.contiguous(memory_format=torch.channels_last))
            seen += len(batch)
    if seen == 0:
        raise ValueError("calibration needs at least one image")
    model.int8_state = _observer_state(prepared)
    return seen


def int8_graph(model: SSD) -> torch.fx.GraphModule:
    """The quantized (not yet compiled) backbone and head of a calibrated `model`, rebuilt from its fp32
    weights and `model.int8_state`."""
    if model.int8_state is None:
        raise ValueError(f"precision 'int8' needs a calibrated model: run `ssd quantize --weights W --data DIR "
                         f"--output W_int8.pt` and load its output ({model.arch} has no int8 calibration)")
    prepared = _prepare(model)
    expected = set(_observer_state(prepared))
    if expected != set(model.int8_state):
        raise ValueError(
            f"the int8 calibration of this {model.arch} does not fit the graph PyTorch {torch.__version__} exports "
            f"(missing {sorted(expected - set(model.int8_state))[:5]}, unexpected "
            f"{sorted(set(model.int8_state) - expected)[:5]}): run `ssd quantize` again")
    with _quiet():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        prepared.load_state_dict(model.int8_state, strict=False)
        return convert_pt2e(prepared)


class CompiledInt8(nn.Module):
    """The quantized graph compiled for one batch size, chosen by its first call: a smaller batch is
    padded to it, a larger one runs in slices of it. Returns the head outputs in fp32, as
    `SSD.forward_head` does, and the feature maps' sizes."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph
        self.batch_size: int | None = None
        self._compiled: Any = None

    def train(self, mode: bool = True) -> CompiledInt8:
        # An exported graph refuses train()/eval() (torchao): it always runs as exported, in eval mode.
        self.training = mode
        return self

    def _run(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Any]]:
        """One compiled call; the first compiles the graph for `len(batch)` and returns its outputs."""
        import torch._inductor.config

        first = self._compiled is None
        if first:
            self.batch_size = len(batch)
            log.info("compiling the int8 network for batches of %d (once per process)", self.batch_size)
            started = time.perf_counter()
            self._compiled = torch.compile(self.graph, dynamic=False)
        try:
            # freezing folds the int8 weights into constants that inductor prepacks for oneDNN (a compile
            # option does not reach the pass that needs it; patched here, the process keeps its setting).
            with torch._inductor.config.patch(freezing=True), _quiet():
                outputs = self._compiled(batch)
        except Exception as exc:
            if not first:
                raise
            self._compiled = self.batch_size = None
            raise RuntimeError(f"int8 inference compiles its network with torch.compile, which failed (it needs "
                               f"a C++ compiler such as g++ on the CPU node): {str(exc).splitlines()[0]}") from exc
        if first:
            log.info("int8 network compiled in %.1f s", time.perf_counter() - started)
        return outputs

    def forward(self, batch: Tensor) -> tuple[dict[str, Tensor], list[Any]]:
        # Compiled for plain NCHW input: its first kernel quantizes and lays out for oneDNN in one pass
        # (converting to channels_last first is a separate pass, ~4% of SSDLite's network).
        batch = batch.contiguous()
        with torch.no_grad():
            size = self.batch_size or len(batch)  # the first call compiles for its own size
            parts, grid = [], None
            for start in range(0, len(batch), size):
                chunk = batch[start:start + size]
                count = len(chunk)
                if count < size:  # padded with zeros to the compiled size; the padding's outputs are dropped
                    chunk = torch.cat([chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))])
                outputs, grid = self._run(chunk)
                parts.append({key: value[:count].float() for key, value in outputs.items()})
        if len(parts) == 1:
            return parts[0], grid
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}, grid


def int8_module(model: SSD) -> nn.Module:
    """What `optimize_for_inference` puts in `SSD.int8_network`."""
    return CompiledInt8(int8_graph(model))


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
