"""The SSD paper's VGG16 extractor (section 3 and figure 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd_core.heads import xavier_init

# (mid channels, out channels, kernel, stride, padding) of each extra block after fc7.
ExtraSpec = Sequence[tuple[int, int, int, int, int]]


def _extra_blocks(spec: ExtraSpec, in_channels: int) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for mid, out, kernel, stride, padding in spec:
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_channels, mid, kernel_size=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, out, kernel_size=kernel, stride=stride, padding=padding),
                nn.ReLU(inplace=True),
            )
        )
        in_channels = out
    xavier_init(blocks)
    return blocks


class VGGExtractor(nn.Module):
    """VGG16 `features` reshaped for SSD: ceil-mode pool3 (38x38 conv4_3 at 300 px), conv4_3
    L2-normalised with a learnable per-channel scale (initial 20), pool5 as 3x3 stride 1, fc6 as an
    atrous 3x3 convolution (dilation 6) and fc7 as 1x1, then the extra blocks of `extra_spec`.

    The module names match torchvision's SSDFeatureExtractorVGG so its weights load unchanged.
    """

    def __init__(self, vgg_features: nn.Sequential, extra_spec: ExtraSpec) -> None:
        super().__init__()
        pools = [i for i, layer in enumerate(vgg_features) if isinstance(layer, nn.MaxPool2d)]
        pool3, pool4 = pools[2], pools[3]
        vgg_features[pool3].ceil_mode = True  # Caffe rounds up; PyTorch would give 37x37
        self.scale_weight = nn.Parameter(torch.ones(512) * 20)
        self.features = nn.Sequential(*vgg_features[:pool4])  # up to conv4_3 + ReLU
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=False),  # modified pool5
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        )
        xavier_init(fc)
        extra = _extra_blocks(extra_spec, 1024)
        extra.insert(0, nn.Sequential(*vgg_features[pool4:-1], fc))  # pool4 .. conv5_3, fc6, fc7
        self.extra = extra
        self.out_channels = [512, 1024] + [spec[1] for spec in extra_spec]
        # Stage starts (conv1 .. conv5) in the original `features` indexing, for freezing.
        self.stage_starts = [0] + pools[:-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.features(x)
        outputs = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs


def freeze_vgg(features: nn.Sequential, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` (0-5) convolution stages of VGG `features`."""
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    stage_starts = [0] + pools[:-1]
    if not 0 <= trainable_layers <= len(stage_starts):
        raise ValueError(f"trainable_backbone_layers must be in 0..{len(stage_starts)}, got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else stage_starts[len(stage_starts) - trainable_layers]
    for layer in features[:freeze_before]:
        for param in layer.parameters():
            param.requires_grad_(False)
