"""Classification and regression heads: one small predictor per feature map.

Outputs follow torchvision's layout, FloatTensor[N, sum(H*W*A), K] with channel a*K + k of a
predictor holding value k of default box a, so state_dicts load both ways.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation


def xavier_init(module: nn.Module) -> None:
    """The paper's init for new convolutions: Xavier-uniform weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """SSDLite's init (torchvision): N(0, 0.03) weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, mean=0.0, std=std)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


class ScoringHead(nn.Module):
    """Applies one predictor per feature map and concatenates [N, H*W*A, K] across maps."""

    def __init__(self, module_list: nn.ModuleList, num_columns: int) -> None:
        super().__init__()
        self.module_list = module_list
        self.num_columns = num_columns

    def forward(self, features: list[Tensor]) -> Tensor:
        outputs = []
        for predictor, feature in zip(self.module_list, features):
            out = predictor(feature)  # [N, A*K, H, W]
            n, _, h, w = out.shape
            out = out.view(n, -1, self.num_columns, h, w).permute(0, 3, 4, 1, 2)  # [N, H, W, A, K]
            outputs.append(out.reshape(n, -1, self.num_columns))
        return torch.cat(outputs, dim=1)


def plain_predictor(in_channels: int, out_channels: int) -> nn.Module:
    """The paper's predictor: one 3x3 convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def batchnorm_predictor(in_channels: int, out_channels: int) -> nn.Module:
    """3x3 conv-BN-ReLU then a 1x1 projection: steadier training for small batches."""
    return nn.Sequential(
        Conv2dNormActivation(in_channels, in_channels, kernel_size=3, norm_layer=nn.BatchNorm2d),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
    )


def separable_predictor(in_channels: int, out_channels: int, norm_layer: Callable[..., nn.Module]) -> nn.Module:
    """SSDLite's predictor: 3x3 depthwise conv-BN-ReLU6, then a 1x1 projection."""
    return nn.Sequential(
        Conv2dNormActivation(
            in_channels, in_channels, kernel_size=3, groups=in_channels,
            norm_layer=norm_layer, activation_layer=nn.ReLU6,
        ),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
    )


class SSDHead(nn.Module):
    """Class scores and box offsets for every default box.

    `kind` picks the predictor: "plain" (SSD), "batchnorm", or "separable" (SSDLite).
    """

    def __init__(
        self,
        in_channels: list[int],
        num_anchors: list[int],
        num_classes: int,
        *,
        kind: str = "plain",
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if kind == "plain":
            make = plain_predictor
        elif kind == "batchnorm":
            make = batchnorm_predictor
        elif kind == "separable":
            def make(i: int, o: int) -> nn.Module:
                return separable_predictor(i, o, norm_layer)
        else:
            raise ValueError(f"unknown head kind {kind!r}; expected plain, batchnorm or separable")
        cls = nn.ModuleList(make(c, num_classes * a) for c, a in zip(in_channels, num_anchors))
        reg = nn.ModuleList(make(c, 4 * a) for c, a in zip(in_channels, num_anchors))
        if kind == "separable":
            normal_init(cls)
            normal_init(reg)
        else:
            xavier_init(cls)
            xavier_init(reg)
        self.classification_head = ScoringHead(cls, num_classes)
        self.regression_head = ScoringHead(reg, 4)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {
            "bbox_regression": self.regression_head(features),
            "cls_logits": self.classification_head(features),
        }
