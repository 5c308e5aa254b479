"""The image-independent mask family: windows that cover every patch position r x r times.

Per axis of side n, with patch side p, stride s and coverage r: windows of side
``w = p + r*s - 1`` start at ``-(r-1)*s + i*s`` for ``i = 0 .. K-1``,
``K = ceil((n - p + 1) / s) + r - 1``, and are clipped to the image. A patch starting at q lies
inside windows ``i .. i+r-1`` for ``i = floor(q / s)``, so every patch position lies inside an
r x r block of adjacent windows; the negative start is what gives corner patches r windows too.
The family is the product of both axes (row-major order). It depends on the image size only,
never on the image: the certificate is sound only then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scalecert.errors import InvalidOption

Box = tuple[int, int, int, int]  # (top, left, bottom, right), ends exclusive


def stride_for(side: int, patch_px: int, masks_per_axis: int, r: int) -> int:
    """Smallest stride whose family has at most ``masks_per_axis`` windows on this axis."""
    if masks_per_axis < r:
        raise InvalidOption(f"masks_per_axis: must be >= r ({r}), got {masks_per_axis}")
    return math.ceil((side - patch_px + 1) / (masks_per_axis - r + 1))


def axis_windows(side: int, patch_px: int, stride: int, r: int) -> tuple[tuple[int, int], ...]:
    """Clipped ``(start, stop)`` windows of one axis, in order."""
    if not 1 <= patch_px <= side:
        raise InvalidOption(f"patch_px: {patch_px} does not fit an image side of {side}")
    count = math.ceil((side - patch_px + 1) / stride) + r - 1
    width = patch_px + r * stride - 1
    windows = []
    for i in range(count):
        start = -(r - 1) * stride + i * stride
        windows.append((max(start, 0), min(start + width, side)))
    return tuple(windows)


@dataclass(frozen=True)
class MaskFamily:
    """All mask windows for one image size; mask ``i * len(cols) + j`` is rows[i] x cols[j]."""

    height: int
    width: int
    patch_px: int
    r: int
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    @classmethod
    def build(
        cls,
        image_hw: tuple[int, int],
        patch_px: int,
        r: int = 1,
        mask_stride: int | None = None,
        masks_per_axis: int | None = None,
    ) -> "MaskFamily":
        """The family for an image of ``image_hw``; give the stride or the masks per axis."""
        height, width = image_hw
        if patch_px > min(height, width):
            raise InvalidOption(
                f"patch_px: a {patch_px} px patch is larger than the image ({height}x{width})"
            )
        if (mask_stride is None) == (masks_per_axis is None):
            raise InvalidOption("give exactly one of mask_stride and masks_per_axis")
        axes = []
        for side in (height, width):
            stride = mask_stride or stride_for(side, patch_px, masks_per_axis, r)  # type: ignore[arg-type]
            axes.append(axis_windows(side, patch_px, stride, r))
        return cls(height, width, patch_px, r, axes[0], axes[1])

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
