"""Inference-only copies of a model: `optimize_for_inference(model)` is what prediction, evaluation, bulk
detection and the benchmarks run; `SSD` itself stays the plain, trainable network.

For bf16/fp16 the copy has BatchNorm folded into the convolution before it, each ReLU/ReLU6/Hardswish
fused into the convolution before it (one oneDNN call on CPU), and its weights cast once in channels_last
instead of autocast recasting all of them on every call; in fp32 it is the plain network in eval mode. Its outputs follow the plain
model's (fp32: within float rounding; bf16: no further from fp32 than autocast, see tests/test_inference.py).
`compile_network` puts such a copy's network through torch.compile (a GPU node's check times it).
For int8 (a model calibrated by `ssd_core.quantize`) backbone and head become one quantized graph
(`SSD.int8_network`, rebuilt from the calibration, compiled on its first batch); pre- and post-processing
stay fp32.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ssd_core.model import SSD


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d into the Conv2d right before it (in a Sequential, or a
    ResNet bottleneck's convN/bnN pairs), in place: one pass over the activations less."""
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names[:-1], names[1:]):
                conv, bn = parent._modules[first], parent._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                    parent._modules[second] = nn.Identity()
        for index in (1, 2, 3):
            conv, bn = getattr(parent, f"conv{index}", None), getattr(parent, f"bn{index}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                setattr(parent, f"bn{index}", nn.Identity())
    return module


# oneDNN post-op (name, scalars) for activations a convolution can apply as it writes its output.
_POST_OPS: dict[type, tuple[str, list[float]]] = {
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
    nn.Hardswish: ("hardswish", []),
}


@functools.cache
def _fused_conv_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused convolution runs here for weights of ``dtype`` (bf16 needs AVX512 or newer)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class FusedConvActivation(nn.Module):
    """A Conv2d and the activation after it as one oneDNN call on CPU (the activation applied while
    the output is written: one pass over it less); elsewhere the two modules as they were."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module) -> None:
        super().__init__()
        self.conv, self.activation = conv, activation
        self.attr, self.scalars = _POST_OPS[type(activation)]
        self.fused = _fused_conv_available()

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and x.device.type == "cpu" and not torch.jit.is_tracing() and _fused_conv_available(
                self.conv.weight.dtype):
            conv = self.conv
            # Autocast does not know this op: cast as it would for the convolution.
            return torch.ops.mkldnn._convolution_pointwise(
                x.to(conv.weight.dtype), conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups, self.attr, self.scalars, None,
            )
        return self.activation(self.conv(x))


def fuse_conv_activation(module: nn.Module) -> nn.Module:
    """Replace, in place, every Conv2d followed in a Sequential by ReLU, ReLU6 or Hardswish (Identity
    left by `fold_batchnorm` in between is skipped) with a `FusedConvActivation`. For inference."""
    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = [name for name, child in parent._modules.items() if not isinstance(child, nn.Identity)]
        for first, second in zip(names[:-1], names[1:]):
            conv, activation = parent._modules[first], parent._modules[second]
            if (isinstance(conv, nn.Conv2d) and type(activation) in _POST_OPS and conv.padding_mode == "zeros"
                    and not isinstance(conv.padding, str)):
                parent._modules[first] = FusedConvActivation(conv, activation)
                parent._modules[second] = nn.Identity()
    return module


def optimize_for_inference(model: SSD, precision: str | None = None, device: torch.device | str | None = None) -> SSD:
    """An eval-mode copy of ``model`` for inference in ``precision`` (default: the model's own) on
    ``device`` (default: where its parameters are). The original is left untouched (training, saving and
    exporting use it); the copy must not be trained or saved."""
    if getattr(model, "inference_optimized", False):
        return model if precision in (None, model.precision) else optimize_for_inference(
            model.source_model, precision, device)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shared = {id(model.int8_state): model.int8_state}  # read-only: the copy shares it
    optimized = copy.deepcopy(model, memo=shared).eval().to(device)
    optimized.set_precision(precision or model.precision)
    concrete = optimized.effective_precision(device)
    if concrete == "int8":
        from ssd_core.quantize import int8_module

        optimized.int8_network = int8_module(model)
        optimized.backbone = optimized.head = None  # the graph holds their int8 versions
        return _mark_optimized(optimized, model)
    optimized.int8_state = None  # only the int8 copy uses it
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(concrete)
    for name in ("backbone", "head"):
        module = getattr(optimized, name).requires_grad_(False)
        if dtype is not None:  # fp32 stays the plain network (bit for bit torchvision's numerics)
            module = fuse_conv_activation(fold_batchnorm(module)).to(dtype=dtype, memory_format=torch.channels_last)
        setattr(optimized, name, module)
    return _mark_optimized(optimized, model)


def _mark_optimized(optimized: SSD, model: SSD) -> SSD:
    optimized.inference_optimized = True
    object.__setattr__(optimized, "source_model", model)  # not a submodule: never saved
    return optimized


def compile_network(model: SSD, **options) -> SSD:
    """``model`` (an `optimize_for_inference` copy) with its backbone and head run through `torch.compile`
    (in place; ``options`` go to it). Pre- and post-processing stay eager: their shapes follow the inputs
    and the detections. The first call compiles (tens of seconds on a GPU); a new batch shape compiles
    again."""
    if not getattr(model, "inference_optimized", False):
        raise ValueError("compile_network takes an optimize_for_inference copy, not the trainable model")
    model.backbone = torch.compile(model.backbone, **options)
    model.head = torch.compile(model.head, **options)
    return model
