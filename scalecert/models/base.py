"""What every classifier in the registry provides: named stages, and a split into f and g.

A ``StagedClassifier`` runs a fixed sequence of named stages (normalisation first, so masks act
on [0, 1] pixels). Splitting it after a superficial layer gives the stem f (whose geometry is
derived from its modules, for footprints) and the rest g. Stage modules are the network's own
submodules, so f and g share the weights and the state_dict keeps the architecture's key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scalecert.errors import InvalidOption
from scalecert.geometry import Geometry, geometry_of


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on [0, 1] inputs; not part of the state_dict."""

    is_pointwise = True

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Split:
    """A classifier cut after superficial layer ``layer``: ``head(stem(x))`` is the network."""

    layer: str
    stem: nn.Sequential
    head: nn.Sequential
    geometry: Geometry


class StagedClassifier(nn.Module):
    """Base class: subclasses build their layers and name them in ``stage_names``.

    Class attributes a subclass sets:
      ``stage_names``: the attributes that hold the stages, in forward order.
      ``superficial_layers``: stage names whose output is non-negative (after a ReLU) and
      spatial, where a split is allowed; the first is the default.
      ``input_size``: the image side the architecture was made for (e.g. 32 or 224).
    """

    stage_names: tuple[str, ...] = ()
    superficial_layers: tuple[str, ...] = ()
    input_size: int = 224

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.checkpoint_sha256: str | None = None

    def stages(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every stage, in forward order."""
        return [(name, getattr(self, name)) for name in self.stage_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x

    @property
    def default_layer(self) -> str:
        return self.superficial_layers[0]

    def split(self, layer: str | None = None) -> Split:
        """Cut after ``layer`` (default: the first superficial layer)."""
        layer = self.default_layer if layer is None else layer
        if layer not in self.superficial_layers:
            raise InvalidOption(
                f"layer: unknown superficial layer {layer!r} for {self.name}; "
                f"choose one of {', '.join(self.superficial_layers)}"
            )
        stages = self.stages()
        cut = [name for name, _ in stages].index(layer) + 1
        stem = nn.Sequential(*(module for _, module in stages[:cut]))
        head = nn.Sequential(*(module for _, module in stages[cut:]))
        return Split(layer=layer, stem=stem, head=head, geometry=geometry_of(stem))
