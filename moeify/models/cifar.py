"""CIFAR-style backbones of the AdvMoE paper (3x3 stem, no max-pool): ResNet-18 (any width), a small
three-stage ResNet, WRN-28-10, VGG-16-bn and a DenseNet-BC. Plain nn.Modules, traced like any other."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with BasicBlocks for small images; ``blocks`` per stage, stage widths width * 2^i."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 10,
                 in_chans: int = 3, stem_stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stage = [BasicBlock(cin if j == 0 else cout, cout, 1 if (i == 0 or j > 0) else 2) for j in range(n)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + short


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (one linear classifier, as in CIFAR practice)."""

    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c = max(1, int(v * width))
                layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv1(F.relu(self.bn1(x)))
        o = self.conv2(F.relu(self.bn2(o)))
        return torch.cat([x, o], 1)


class DenseNetCifar(nn.Module):
    """DenseNet-BC for small images (default: DenseNet-121's block sizes, growth 32)."""

    def __init__(self, blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32, num_classes: int = 10,
                 in_chans: int = 3) -> None:
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(in_chans, c, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                stages.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = c // 2
                stages += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet18(num_classes: int = 10, in_chans: int = 3, width: int = 64, stem_stride: int = 1) -> nn.Module:
    """The paper's CIFAR ResNet-18; ``width`` scales every stage, ``stem_stride`` 2 quarters the compute."""
    return ResNetCifar((2, 2, 2, 2), width, num_classes, in_chans, stem_stride)


def cifar_resnet_small(num_classes: int = 10, in_chans: int = 3, width: int = 16, stem_stride: int = 1) -> nn.Module:
    """Three stages of one block (widths 16, 32, 64): the quickstart backbone (stem_stride 2 there)."""
    return ResNetCifar((1, 1, 1), width, num_classes, in_chans, stem_stride)


def cifar_wrn28_10(num_classes: int = 10, in_chans: int = 3, widen: int = 10) -> nn.Module:
    return WideResNet(28, widen, num_classes, in_chans)


def cifar_vgg16_bn(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> nn.Module:
    return VGG(num_classes, in_chans, width)


def cifar_densenet121(num_classes: int = 10, in_chans: int = 3, growth: int = 32) -> nn.Module:
    return DenseNetCifar((6, 12, 24, 16), growth, num_classes, in_chans)


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet_small": cifar_resnet_small,
    "cifar_wrn28_10": cifar_wrn28_10,
    "cifar_vgg16_bn": cifar_vgg16_bn,
    "cifar_densenet121": cifar_densenet121,
}
