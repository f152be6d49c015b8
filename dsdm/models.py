"""Networks, behind a timm-style registry.

Every model maps already-normalised images (N, C, H, W) to logits, and exposes
``embed(x) -> (N, feature_dim)``: the flattened features right before the classifier,
which is what distribution matching compares. ``feature_dim`` is an int attribute
computed from the geometry at construction, so callers can size buffers (memory bank,
covariance) without a dummy forward pass.

    model = get_model("convnet3", channels=3, num_classes=10, image_size=(32, 32))
    model.feature_dim  # 2048

Initialisation uses the global torch RNG; callers that need a reproducible network wrap
the call in ``torch.random.fork_rng()`` + ``torch.manual_seed(seed)`` (see dsdm.train).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import DenseNet
from torchvision.models.resnet import BasicBlock

from dsdm.errors import DsdmError

Builder = Callable[[int, int, tuple[int, int]], nn.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_model("convnet3")`` on a ``fn(channels, num_classes, image_size)``."""
    def deco(fn: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model '{name}' registered twice")
        MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(MODELS)


def get_model(name: str, channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """A freshly initialised network; unknown names raise DsdmError listing the valid ones."""
    if name not in MODELS:
        raise DsdmError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    h, w = (int(s) for s in image_size)
    if channels < 1 or num_classes < 1 or h < 1 or w < 1:
        raise DsdmError(f"model '{name}' needs channels, num_classes and image size >= 1, got "
                        f"channels={channels}, num_classes={num_classes}, image_size={tuple(image_size)}")
    return MODELS[name](int(channels), int(num_classes), (h, w))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- ConvNet (DC/DM/IDC family) ------------------------------------------------------------

class ConvNet(nn.Module):
    """depth x [conv3x3 -> instance norm -> ReLU -> avgpool 2x2], then Linear.

    Instance norm is GroupNorm(width, width): one group per channel, with affine params,
    exactly the DC/DM "instancenorm". 28x28 inputs get padding 3 on the first conv so the
    net sees 32x32 and feature_dim stays 128*4*4 = 2048 (as the DC code does for MNIST).
    A pool is skipped once the map is 1x1, so tiny inputs (8x8 digits, depth 4) still run.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int],
                 depth: int = 3, width: int = 128):
        super().__init__()
        h, w = image_size
        first_pad = 3 if (h, w) == (28, 28) else 1
        layers: list[nn.Module] = []
        in_ch = channels
        for d in range(depth):
            pad = first_pad if d == 0 else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2  # conv3x3 output size
            layers += [nn.Conv2d(in_ch, width, 3, padding=pad),
                       nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True)]
            if h >= 2 and w >= 2:
                layers.append(nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))  # (N, num_classes)


@register_model("convnet3")
def convnet3(channels: int, num_classes: int, image_size: tuple[int, int]) -> ConvNet:
    return ConvNet(channels, num_classes, image_size, depth=3)


@register_model("convnet4")
def convnet4(channels: int, num_classes: int, image_size: tuple[int, int]) -> ConvNet:
    """ConvNet-4: the spec's net for 64x64 spectrograms (64 / 2^4 = 4, so d = 2048)."""
    return ConvNet(channels, num_classes, image_size, depth=4)


# --- ResNet-10 (CIFAR-style) ----------------------------------------------------------------

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


@register_model("resnet10")
def resnet10(channels: int, num_classes: int, image_size: tuple[int, int]) -> ResNet10:
    return ResNet10(channels, num_classes, image_size)


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


@register_model("densenet121")
def densenet121(channels: int, num_classes: int, image_size: tuple[int, int]) -> DenseNetCifar:
    return DenseNetCifar(channels, num_classes)


def build_model(arch: str, channels: int, num_classes: int, image_size: tuple[int, int], seed: int):
    """A freshly initialised network; seeding stays local so callers' RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(arch, channels, num_classes, image_size)
