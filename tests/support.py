"""Helpers shared by several test modules."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int, spread: float = 0.2) -> nn.Module:
    """Random BN affine parameters and running statistics, in place (fresh BNs are near-identity,
    which would hide key mix-ups and leave many ReLUs dead or all alive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(spread * torch.randn(c, generator=generator))
                module.running_mean.copy_(spread * torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_class_subset(source: Path, target: Path, per_class: int) -> Path:
    """The first ``per_class`` files of every class folder of ``source``, copied to ``target``."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, target / folder.name / path.name)
    return target
