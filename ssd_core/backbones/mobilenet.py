"""SSDLite extractors on MobileNetV3 / MobileNetV2 (MobileNetV3 paper, section 6.3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ssd_core.heads import normal_init


def _inner(block: nn.Module) -> nn.Sequential:
    """The layer sequence of an inverted residual block (`block` in V3, `conv` in V2)."""
    return block.block if hasattr(block, "block") else block.conv


def _extra_block(in_channels: int, out_channels: int, norm_layer: Callable[..., nn.Module]) -> nn.Sequential:
    mid = out_channels // 2
    return nn.Sequential(
        Conv2dNormActivation(in_channels, mid, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
        Conv2dNormActivation(
            mid, mid, kernel_size=3, stride=2, groups=mid, norm_layer=norm_layer, activation_layer=nn.ReLU6
        ),
        Conv2dNormActivation(mid, out_channels, kernel_size=1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
    )


class Fp32GradDepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution that runs in fp32 when it trains under CPU autocast: oneDNN's bf16
    backward of strided or 5x5 depthwise convolutions takes 2.5-25x the time of fp32's (e.g. 118 vs 9 ms
    for 672 channels, 5x5, stride 2 on 20x20, batch 8, one thread), while bf16 wins for 3x3 stride-1 ones
    and for the forward pass alone (inference keeps bf16). Parameters and state_dict as nn.Conv2d."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight, self.bias)
        return super().forward(x)


def use_fp32_grad_depthwise(module: nn.Module) -> nn.Module:
    """Make every strided or larger-than-3x3 depthwise Conv2d in `module` a `Fp32GradDepthwiseConv2d`
    (sharing its parameters); returns `module`."""
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
                and (max(conv.stride) > 1 or max(conv.kernel_size) > 3)):
            conv.__class__ = Fp32GradDepthwiseConv2d  # the same module object: parameters, hooks, frozen flags
    return module


def plain_depthwise(module: nn.Module) -> nn.Module:
    """Undo `use_fp32_grad_depthwise` in `module` (for graph tracing and quantization, which need plain
    nn.Conv2d modules); returns `module`."""
    for conv in module.modules():
        if type(conv) is Fp32GradDepthwiseConv2d:
            conv.__class__ = nn.Conv2d
    return module


def stage_starts(features: nn.Sequential) -> list[int]:
    """Indices of the first block and of every strided block, plus the last layer."""
    strided = [
        i for i, b in enumerate(features) if getattr(b, "_is_cn", False) or getattr(b, "stride", 1) > 1
    ]
    return [0] + strided + [len(features) - 1]


class MobileNetExtractor(nn.Module):
    """Feature maps: the expansion layer of the C4 block (stride 16), the last layer (stride 32),
    then depthwise-separable extra blocks of `extra_channels`.

    Module names match torchvision's SSDLiteFeatureExtractorMobileNet so its weights load unchanged.
    """

    def __init__(
        self,
        features: nn.Sequential,
        c4_pos: int,
        norm_layer: Callable[..., nn.Module],
        extra_channels: Sequence[int] = (512, 256, 256, 128),
    ) -> None:
        super().__init__()
        c4 = features[c4_pos]
        if getattr(c4, "use_res_connect", False):
            raise ValueError(f"block {c4_pos} has a residual connection; it cannot be split at C4")
        inner = _inner(c4)
        self.features = nn.Sequential(
            nn.Sequential(*features[:c4_pos], inner[0]),  # up to the C4 expansion layer
            nn.Sequential(inner[1:], *features[c4_pos + 1 :]),  # C4 depthwise to the end
        )
        channels = [features[-1].out_channels, *extra_channels]
        extra = nn.ModuleList(_extra_block(i, o, norm_layer) for i, o in zip(channels[:-1], channels[1:]))
        normal_init(extra)
        self.extra = extra
        self.out_channels = [inner[0].out_channels, features[-1].out_channels, *extra_channels]
        use_fp32_grad_depthwise(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for block in self.features:
            x = block(x)
            outputs.append(x)
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs


def freeze_mobilenet(features: nn.Sequential, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` stages (0..number of stages)."""
    starts = stage_starts(features)
    if not 0 <= trainable_layers <= len(starts):
        raise ValueError(f"trainable_backbone_layers must be in 0..{len(starts)}, got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
    for layer in features[:freeze_before]:
        for param in layer.parameters():
            param.requires_grad_(False)
