"""CIFAR ResNets: He et al. 2016's ResNet-20/32/44/56 (option-A shortcuts) and ResNet-18.

``CifarResNet`` reproduces the architecture and state_dict key names of the akamaster
checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``layer{1,2,3}.{i}.bn{1,2}``,
``linear``), so those files load after stripping their ``module.`` prefix. ``CifarResNet18`` is
the common CIFAR ResNet-18 (3x3 stem, no max-pool, option-B shortcuts ``shortcut.0/1``).
Both normalise [0, 1] inputs as their first stage, so masks act on pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalecert.errors import InvalidOption
from scalecert.geometry import Chain, Geometry, Parallel, Window, geometry_of
from scalecert.models.base import Normalize, StagedClassifier

# The akamaster checkpoints were trained with ImageNet statistics, so both models use them.
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _kaiming_init(module: nn.Module) -> None:
    """The akamaster initialisation: Kaiming-normal convolutions and linear layers."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` (``x[:, :, ::2, ::2]`` for stride 2),
    then zero-pad ``pad`` channels on each side (the paper's option A)."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def geometry(self) -> Geometry:
        """Output position j reads input pixel ``stride * j`` only."""
        s = self.stride
        return Window(kernel=(1, 1), stride=(s, s), padding=(0, 0))


def option_a_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """He et al.'s parameter-free shortcut (akamaster's ResNet-20/32/44/56)."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if planes - in_planes != 2 * (planes // 4):
        raise InvalidOption(
            f"option-A shortcut pads planes//4 channels per side: cannot map "
            f"{in_planes} to {planes} channels"
        )
    return OptionAShortcut(stride, planes // 4)


def option_b_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """A 1x1 convolution and batch norm when the shape changes (keys ``shortcut.0/1``)."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut (option A or B); ReLU after the sum."""

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1,
        shortcut: Callable[[int, int, int], nn.Module] = option_a_shortcut,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def geometry(self) -> Geometry:
        main = Chain((geometry_of(self.conv1), geometry_of(self.conv2)))
        return Parallel((main, geometry_of(self.shortcut)))


class CifarResNet(StagedClassifier):
    """He et al.'s CIFAR ResNet of depth 6n+2: three stages of n basic blocks (16/32/64
    channels), global average pooling and a linear classifier."""

    stage_names = ("normalize", "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "pool",
                   "linear")
    superficial_layers = ("relu", "layer1", "layer2")
    input_size = 32

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise InvalidOption(
                f"depth: CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}"
            )
        super().__init__(f"cifar_resnet{depth}", num_classes)
        self.depth = depth
        n = (depth - 2) // 6
        self.normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.linear = nn.Linear(64, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlock(in_planes, planes, stride)]
        layers += [CifarBasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)


class CifarResNet18(StagedClassifier):
    """The common CIFAR ResNet-18: 3x3 stem without max-pool, four stages of two blocks
    (64/128/256/512 channels), global average pooling, ``linear``."""

    stage_names = ("normalize", "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4",
                   "pool", "linear")
    superficial_layers = ("relu", "layer1", "layer2")
    input_size = 32

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__("cifar_resnet18", num_classes)
        self.normalize = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, 512, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.linear = nn.Linear(512, num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            CifarBasicBlock(in_planes, planes, stride, option_b_shortcut),
            CifarBasicBlock(planes, planes, shortcut=option_b_shortcut),
        )
