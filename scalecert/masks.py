"""The image-independent mask family: windows that cover every patch position r x r times.

Per axis of side n, with patch side p, stride s and coverage r: windows of side
``w = p + r*s - 1`` start at ``-(r-1)*s + i*s`` for ``i = 0 .. K-1``,
``K = ceil((n - p + 1) / s) + r - 1``, and are clipped to the image. A patch starting at q lies
inside windows ``i .. i+r-1`` for ``i = floor(q / s)``, so every patch position lies inside an
r x r block of adjacent windows; the negative start is what gives corner patches r windows too.
The family is the product of both axes (row-major order). It depends on the image size only,
never on the image: the certificate is sound only then.

That is the "clipped" layout (the default). The "patchcleanser" layout (r = 1 only) is the one of
the reference PatchCleanser's mask sets: windows of side ``w = min(p + s - 1, n)`` start at
``0, s, 2s, ...`` while they fit in the image, and when the last of those does not reach the
image's end, one more starts at ``n - w``: the last window is shifted inward at full size
instead of clipped. Both layouts have the same number of windows per axis; the reference layout
occludes more pixels. docs/DESIGN-NOTES.md proves that each covers every patch position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scalecert.config import WINDOW_LAYOUTS
from scalecert.errors import InvalidOption

Box = tuple[int, int, int, int]  # (top, left, bottom, right), ends exclusive


def stride_for(side: int, patch_px: int, masks_per_axis: int, r: int) -> int:
    """Smallest stride whose family has at most ``masks_per_axis`` windows on this axis."""
    if masks_per_axis < r:
        raise InvalidOption(f"masks_per_axis: must be >= r ({r}), got {masks_per_axis}")
    return math.ceil((side - patch_px + 1) / (masks_per_axis - r + 1))


def axis_windows(
    side: int, patch_px: int, stride: int, r: int, layout: str = "clipped",
) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` windows of one axis, in order: clipped to the image, or with the
    "patchcleanser" layout, the last one shifted inward at full size (module docstring)."""
    if not 1 <= patch_px <= side:
        raise InvalidOption(f"patch_px: {patch_px} does not fit an image side of {side}")
    _check_layout(layout, r)
    if layout == "patchcleanser":
        return _shifted_windows(side, patch_px, stride)
    count = math.ceil((side - patch_px + 1) / stride) + r - 1
    width = patch_px + r * stride - 1
    windows = []
    for i in range(count):
        start = -(r - 1) * stride + i * stride
        windows.append((max(start, 0), min(start + width, side)))
    return tuple(windows)


def _check_layout(layout: str, r: int) -> None:
    if layout not in WINDOW_LAYOUTS:
        raise InvalidOption(
            f"window_layout: one of {', '.join(WINDOW_LAYOUTS)}, got {layout!r}")
    if layout == "patchcleanser" and r != 1:
        raise InvalidOption(f"window_layout: patchcleanser needs r = 1, got r = {r}")


def _shifted_windows(side: int, patch_px: int, stride: int) -> tuple[tuple[int, int], ...]:
    """Windows of side ``min(p + s - 1, n)`` at multiples of s that fit, then one ending at n
    unless the last of those already does."""
    width = min(patch_px + stride - 1, side)
    starts = list(range(0, side - width + 1, stride))
    if starts[-1] + width < side:
        starts.append(side - width)
    return tuple((start, start + width) for start in starts)


@dataclass(frozen=True)
class MaskFamily:
    """All mask windows for one image size; mask ``i * len(cols) + j`` is rows[i] x cols[j]."""

    height: int
    width: int
    patch_px: int
    r: int
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    layout: str = "clipped"

    @classmethod
    def build(
        cls,
        image_hw: tuple[int, int],
        patch_px: int,
        r: int = 1,
        mask_stride: int | None = None,
        masks_per_axis: int | None = None,
        layout: str = "clipped",
    ) -> "MaskFamily":
        """The family for an image of ``image_hw``; give the stride or the masks per axis.
        ``layout``: "clipped" (default) or "patchcleanser" (r = 1; module docstring)."""
        height, width = image_hw
        if patch_px > min(height, width):
            raise InvalidOption(
                f"patch_px: a {patch_px} px patch is larger than the image ({height}x{width})"
            )
        if (mask_stride is None) == (masks_per_axis is None):
            raise InvalidOption("give exactly one of mask_stride and masks_per_axis")
        _check_layout(layout, r)
        axes = []
        for side in (height, width):
            stride = mask_stride or stride_for(side, patch_px, masks_per_axis, r)  # type: ignore[arg-type]
            axes.append(axis_windows(side, patch_px, stride, r, layout))
        return cls(height, width, patch_px, r, axes[0], axes[1], layout)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def n_masks(self) -> int:
        return len(self.rows) * len(self.cols)

    def boxes(self) -> torch.Tensor:
        """``n_masks x 4`` int64 tensor of (top, left, bottom, right), row-major."""
        return torch.tensor(
            [(top, left, bottom, right) for top, bottom in self.rows for left, right in self.cols],
            dtype=torch.int64,
        ).reshape(-1, 4)

    def block_box(self, row: int, col: int) -> Box:
        """Common area of the r x r block whose top-left mask is (row, col) in the grid."""
        last_row, last_col = row + self.r - 1, col + self.r - 1
        return (
            self.rows[last_row][0], self.cols[last_col][0],
            self.rows[row][1], self.cols[col][1],
        )
