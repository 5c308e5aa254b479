"""ImageNet ResNet-18 and ResNet-50 with torchvision's state_dict key names.

The layers, their order and their attribute names match ``torchvision.models.resnet`` (v1.5:
the stride of a Bottleneck sits on its 3x3 conv), so torchvision checkpoints load unchanged.
Normalisation with the ImageNet statistics is the first stage, so masks act on [0, 1] pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from scalecert.geometry import IDENTITY, Chain, Geometry, Parallel, geometry_of
from scalecert.models.base import Normalize, StagedClassifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)


def _shortcut_geometry(downsample: nn.Sequential | None) -> Geometry:
    return IDENTITY if downsample is None else geometry_of(downsample)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; optional ``downsample`` (1x1 conv + BN) shortcut."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Sequential | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def geometry(self) -> Geometry:
        main = Chain((geometry_of(self.conv1), geometry_of(self.conv2)))
        return Parallel((main, _shortcut_geometry(self.downsample)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision v1.5), 1x1 expand by 4; optional downsample."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Sequential | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def geometry(self) -> Geometry:
        main = Chain((geometry_of(self.conv1), geometry_of(self.conv2), geometry_of(self.conv3)))
        return Parallel((main, _shortcut_geometry(self.downsample)))


class ImageNetResNet(StagedClassifier):
    """torchvision's ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, average pool, ``fc``."""

    stage_names = ("normalize", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                   "layer4", "pool", "fc")
    superficial_layers = ("relu", "maxpool", "layer1")
    input_size = 224

    def __init__(
        self,
        name: str,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__(name, num_classes)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            stage, in_planes = self._make_layer(block, in_planes, planes, blocks, stride)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck],
        in_planes: int,
        planes: int,
        blocks: int,
        stride: int,
    ) -> tuple[nn.Sequential, int]:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or in_planes != out_planes:
            downsample = nn.Sequential(
                _conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes)
            )
        layers = [block(in_planes, planes, stride, downsample)]
        layers += [block(out_planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_planes


def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ImageNetResNet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ImageNetResNet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes)
