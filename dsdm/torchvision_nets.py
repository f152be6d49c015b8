"""ResNet-10 (CIFAR-style) and DenseNet-121 (CIFAR stem, growth 12) from torchvision's blocks:
the cross-architecture evaluation's networks, registered in dsdm/models.py (which imports this
module only when one is built, so processes that train ConvNets never import torchvision.models).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import DenseNet
from torchvision.models.resnet import BasicBlock


class ResNet10(nn.Module):
    """3x3 stem (stride 1, no max-pool), one torchvision BasicBlock per stage, GAP, Linear."""

    widths = (32, 64, 128, 256)
    strides = (1, 2, 2, 2)

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int]):
        super().__init__()
        w0 = self.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(channels, w0, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        blocks, in_ch = [], w0
        for width, stride in zip(self.widths, self.strides):
            downsample = None
            if stride != 1 or in_ch != width:  # projection shortcut, as in torchvision
                downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            blocks.append(BasicBlock(in_ch, width, stride=stride, downsample=downsample))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size, 8x8 digits included
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)  # (N, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --- DenseNet-121 (CIFAR stem, growth 12) ----------------------------------------------------

class DenseNetCifar(DenseNet):
    """torchvision's DenseNet-BC (bottleneck bn_size 4, transitions halve the channels)
    with a CIFAR stem: 3x3 conv stride 1 to 2*growth channels and no initial max-pool.

    Channels: 24 -> +6*12=96 -> 48 -> +12*12=192 -> 96 -> +24*12=384 -> 192 -> +16*12=384,
    so feature_dim = 384. Spatially only the three transitions pool (32 -> 4); the final
    pool is adaptive, so 8x8 inputs reach 1x1 and still run.
    """

    def __init__(self, channels: int, num_classes: int, growth_rate: int = 12,
                 block_config: tuple[int, int, int, int] = (6, 12, 24, 16)):
        stem = 2 * growth_rate
        super().__init__(growth_rate=growth_rate, block_config=block_config,
                         num_init_features=stem, bn_size=4, drop_rate=0, num_classes=num_classes)
        self.features.conv0 = nn.Conv2d(channels, stem, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.features.conv0.weight)  # same init torchvision gives conv0
        del self.features.pool0
        self.feature_dim = self.classifier.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))  # norm5 -> ReLU, as torchvision's forward
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
