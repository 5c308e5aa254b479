"""Receptive-field geometry of a stem, and exact footprints of input windows.

A stem f is a composition of sliding-window layers (convolutions, pooling, strided slicing)
and point-wise layers (batch norm, ReLU, normalisation). For one axis, the input pixels that
can influence output position j of a window layer (kernel k, stride s, padding p, dilation d)
are ``[j*s - p, j*s - p + d*(k-1)]``. Composing these maps backwards through the stem gives the
receptive field of every layer-s position; residual blocks take the hull of their branches
(the shortcut's field lies inside the main branch's, so the hull is the exact union).

``foot(m)`` is the set of layer-s positions whose receptive field meets the window m. Axes are
independent, so a footprint is the product of a row set and a column set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from scalecert.errors import InvalidOption

Span = tuple[int, int]  # inclusive [lo, hi] interval of input pixels on one axis


class Geometry(Protocol):
    """Maps an inclusive span of output positions to the inclusive span of inputs it reads."""

    def input_span(self, span: Span, axis: int) -> Span: ...


@dataclass(frozen=True)
class Window:
    """A sliding-window layer: per-axis (rows, cols) kernel, stride, padding and dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)

    def input_span(self, span: Span, axis: int) -> Span:
        lo, hi = span
        s, p = self.stride[axis], self.padding[axis]
        reach = self.dilation[axis] * (self.kernel[axis] - 1)
        return lo * s - p, hi * s - p + reach


IDENTITY = Window(kernel=(1, 1), stride=(1, 1), padding=(0, 0))


@dataclass(frozen=True)
class Chain:
    """Layers applied one after the other (first element first)."""

    layers: tuple[Geometry, ...]

    def input_span(self, span: Span, axis: int) -> Span:
        for layer in reversed(self.layers):
            span = layer.input_span(span, axis)
        return span


@dataclass(frozen=True)
class Parallel:
    """Branches whose outputs are summed (a residual block): the hull of their fields."""

    branches: tuple[Geometry, ...]

    def input_span(self, span: Span, axis: int) -> Span:
        spans = [branch.input_span(span, axis) for branch in self.branches]
        return min(lo for lo, _ in spans), max(hi for _, hi in spans)


@runtime_checkable
class HasGeometry(Protocol):
    """A module that states its own geometry (residual blocks, custom layers)."""

    def geometry(self) -> Geometry: ...


_POINTWISE = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
)  # not GroupNorm: its statistics are taken over the whole map, so it is not point-wise


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def conv_padding(
    padding: str | int | Sequence[int], kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int]:
    """A convolution's leading padding per axis; ``"valid"`` and ``"same"`` (stride 1) as
    torch pads them (``same`` puts the odd pixel at the end)."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        return tuple(dilation[a] * (kernel[a] - 1) // 2 for a in range(2))  # type: ignore[return-value]
    if isinstance(padding, str):
        raise InvalidOption(f"convolution padding {padding!r}: expected valid, same or numbers")
    return _pair(padding)


def geometry_of(module: nn.Module) -> Geometry:
    """Derive the geometry of ``module`` from its layers' own hyper-parameters.

    Raises ``ValueError`` for layers whose receptive field is not local (global pooling,
    linear layers): those cannot be part of a superficial stem.
    """
    if isinstance(module, HasGeometry):
        return module.geometry()
    if isinstance(module, nn.Conv2d):
        kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
        return Window(kernel, _pair(module.stride), conv_padding(module.padding, kernel, dilation),
                      dilation)
    if isinstance(module, nn.MaxPool2d):
        return Window(
            _pair(module.kernel_size), _pair(module.stride or module.kernel_size),
            _pair(module.padding), _pair(module.dilation),
        )
    if isinstance(module, nn.AvgPool2d):
        return Window(
            _pair(module.kernel_size), _pair(module.stride or module.kernel_size),
            _pair(module.padding),
        )
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
        left, _, top, _ = module.padding  # output position j reads input j - leading pad
        return Window((1, 1), (1, 1), (top, left))
    if isinstance(module, nn.Sequential):
        return Chain(tuple(geometry_of(child) for child in module))
    if isinstance(module, _POINTWISE) or getattr(module, "is_pointwise", False):
        return IDENTITY
    raise InvalidOption(
        f"cannot derive receptive-field geometry of {type(module).__name__}: "
        "it is not a local (sliding-window or point-wise) layer"
    )


def receptive_field(geometry: Geometry, position: int, axis: int) -> Span:
    """Inclusive input span read by one output position on one axis."""
    return geometry.input_span((position, position), axis)


class Footprints:
    """foot(m) of any pixel boxes on one feature-map size.

    The receptive field of every position is computed once; a footprint is then a vectorised
    interval test per axis. Boxes are ``(top, left, bottom, right)`` with exclusive ends; an
    empty box (bottom <= top or right <= left) has an empty footprint.
    """

    def __init__(self, geometry: Geometry, feature_hw: tuple[int, int]) -> None:
        self.feature_hw = (int(feature_hw[0]), int(feature_hw[1]))
        fields = [
            torch.tensor([receptive_field(geometry, j, axis) for j in range(size)]).reshape(-1, 2)
            for axis, size in enumerate(self.feature_hw)
        ]
        # per axis, the first and last input pixel of each position's field, as 1 x size rows
        self._bounds = [(field[None, :, 0].contiguous(), field[None, :, 1].contiguous())
                        for field in fields]

    def __call__(self, boxes: torch.Tensor) -> torch.Tensor:
        """``n x 4`` boxes -> ``n x (h*w)`` boolean footprints."""
        rows, cols = self.axis_hits(boxes)
        return (rows[:, :, None] & cols[:, None, :]).flatten(1)

    def axis_hits(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The footprints of ``n x 4`` boxes as ``n x h`` and ``n x w`` booleans: the rows and
        the columns whose receptive field meets each box (on the CPU). The footprint is their
        product, so its size is ``rows.sum(1) * cols.sum(1)``, and position ``p`` is in it iff
        ``rows[p // w] & cols[p % w]``: callers that test a few positions need not build the
        whole ``n x (h*w)`` map."""
        boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4).cpu()
        hits = []
        for axis, (lo, hi) in enumerate(self._bounds):
            start, stop = boxes[:, axis, None], boxes[:, axis + 2, None]
            hits.append((lo <= stop - 1) & (hi >= start) & (stop > start))
        rows, cols = hits
        return rows, cols


def footprint(
    geometry: Geometry, feature_hw: tuple[int, int], box: tuple[int, int, int, int]
) -> torch.Tensor:
    """foot(m) for one pixel box ``(top, left, bottom, right)`` (ends exclusive): an ``h x w``
    boolean map of the layer-s positions whose receptive field meets the box."""
    return Footprints(geometry, feature_hw)(torch.tensor([box]))[0].view(*feature_hw)
