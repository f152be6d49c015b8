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


# --- ResNet-10 and DenseNet-121: built from torchvision's blocks (dsdm/torchvision_nets.py) -----
# imported when one is built: `import torchvision` costs ~1 s of CPU in every process (a
# Ray actor, a CLI) that otherwise needs only ConvNets

@register_model("resnet10")
def resnet10(channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    from dsdm.torchvision_nets import ResNet10

    return ResNet10(channels, num_classes, image_size)


@register_model("densenet121")
def densenet121(channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    from dsdm.torchvision_nets import DenseNetCifar

    return DenseNetCifar(channels, num_classes)


def build_model(arch: str, channels: int, num_classes: int, image_size: tuple[int, int], seed: int):
    """A freshly initialised network; seeding stays local so callers' RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(arch, channels, num_classes, image_size)
