"""NVIDIA's SSD300 ResNet-50 extractor: conv5_x removed, conv4_x at stride 1, five extra blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models import ResNet

from ssd_core.heads import xavier_init

# (mid channels, out channels, stride, padding) of each additional block.
ExtraSpec = Sequence[tuple[int, int, int, int]]


class ResNetExtractor(nn.Module):
    """Feature maps: layer3 (1024 ch, stride 16 -> 38x38 at 300 px) then the additional blocks,
    each 1x1 conv-BN-ReLU and 3x3 conv-BN-ReLU without biases (NVIDIA's layout)."""

    def __init__(self, resnet: ResNet, extra_spec: ExtraSpec) -> None:
        super().__init__()
        block = resnet.layer3[0]
        block.conv1.stride = (1, 1)
        block.conv2.stride = (1, 1)  # torchvision's v1.5 bottleneck strides in conv2
        block.downsample[0].stride = (1, 1)
        self.features = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3
        )
        extra = nn.ModuleList()
        in_channels = 1024
        for mid, out, stride, padding in extra_spec:
            extra.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
                    nn.BatchNorm2d(mid),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(mid, out, kernel_size=3, stride=stride, padding=padding, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            in_channels = out
        xavier_init(extra)
        self.extra = extra
        self.out_channels = [1024] + [spec[1] for spec in extra_spec]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.features(x)
        outputs = [x]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs


def freeze_resnet(features: nn.Sequential, trainable_layers: int) -> None:
    """torchvision's counting: the last `trainable_layers` (0-5) of layer4, layer3, layer2, layer1 and
    conv1+bn1 stay trainable. layer4 was removed here, so 1 trains none of the backbone."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    # features: 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4 layer1, 5 layer2, 6 layer3 (layer4 would come first)
    from_top: list[list[int]] = [[], [6], [5], [4], [0, 1]]
    trainable = {i for group in from_top[:trainable_layers] for i in group}
    for index, layer in enumerate(features):
        if index not in trainable:
            for param in layer.parameters():
                param.requires_grad_(False)
