"""Helpers shared by several test modules."""

from __future__ import annotations

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
