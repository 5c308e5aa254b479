"""The mask family: exhaustive r x r coverage of every patch position, corners included."""

from __future__ import annotations

import itertools

import pytest

from scalecert.masks import MaskFamily, axis_windows, stride_for


def covering_block(windows: tuple[tuple[int, int], ...], q: int, p: int, r: int) -> int | None:
    """First i such that windows i .. i+r-1 all contain the patch [q, q+p)."""
    for i in range(len(windows) - r + 1):
        if all(start <= q and q + p <= stop for start, stop in windows[i:i + r]):
            return i
    return None


def uncovered_positions(family: MaskFamily) -> list[tuple[int, int]]:
    """Every 2-D patch position not inside some r x r block of the grid (exhaustive)."""
    boxes = family.boxes().view(*family.grid_shape, 4)
    p, r = family.patch_px, family.r
    missing = []
    for top in range(family.height - p + 1):
        for left in range(family.width - p + 1):
            inside = (
                (boxes[..., 0] <= top) & (boxes[..., 1] <= left)
                & (boxes[..., 2] >= top + p) & (boxes[..., 3] >= left + p)
            )
            blocks = inside.unfold(0, r, 1).unfold(1, r, 1).flatten(2).all(dim=2)
            if not bool(blocks.any()):
                missing.append((top, left))
    return missing


@pytest.mark.parametrize("r", [1, 2, 3])
def test_every_patch_position_lies_in_an_r_by_r_block_2d(r: int) -> None:
    for (height, width), p, stride in itertools.product([(12, 12), (13, 17)], [1, 2, 5], [1, 2, 3]):
        family = MaskFamily.build((height, width), p, r, mask_stride=stride)
        assert uncovered_positions(family) == [], (height, width, p, stride, r)


def test_every_patch_position_is_covered_for_many_axis_configurations() -> None:
    for side in range(4, 26):
        for p in range(1, side + 1):
            for r in (1, 2, 3, 4):
                for stride in (1, 2, 3, 5, 8):
                    windows = axis_windows(side, p, stride, r)
                    for q in range(side - p + 1):
                        assert covering_block(windows, q, p, r) is not None, (side, p, r, stride, q)
                for per_axis in range(r, r + 6):
                    stride = stride_for(side, p, per_axis, r)
                    windows = axis_windows(side, p, stride, r)
                    assert len(windows) <= per_axis
                    assert all(covering_block(windows, q, p, r) is not None
                               for q in range(side - p + 1))


def test_a_family_starting_at_zero_misses_corner_patches_when_r_exceeds_one() -> None:
    """The negative start matters: the coverage check does catch a family without it."""
    side, p, stride, r = 16, 3, 2, 2
    width = p + r * stride - 1
    count = -(-(side - p + 1) // stride) + r - 1
    from_zero = tuple((i * stride, min(i * stride + width, side)) for i in range(count))
    assert covering_block(from_zero, 0, p, r) is None
    assert covering_block(axis_windows(side, p, stride, r), 0, p, r) is not None


def test_patchcleanser_geometry_at_imagenet_size() -> None:
    family = MaskFamily.build((224, 224), 32, r=1, masks_per_axis=6)
    assert family.n_masks == 36
    boxes = family.boxes()
    assert boxes[0].tolist() == [0, 0, 64, 64]
    starts = [start for start, _ in family.rows]
    assert starts == [0, 33, 66, 99, 132, 165]
    assert boxes[-1].tolist() == [165, 165, 224, 224]  # clipped at the far edge


def test_boxes_are_row_major_with_exclusive_clipped_ends() -> None:
    family = MaskFamily.build((32, 32), 5, r=1, masks_per_axis=6)
    boxes = family.boxes()
    assert boxes.shape == (36, 4)
    assert family.rows == family.cols
    for index, (top, left, bottom, right) in enumerate(boxes.tolist()):
        assert (top, bottom) == family.rows[index // 6]
        assert (left, right) == family.cols[index % 6]
        assert 0 <= top < bottom <= 32 and 0 <= left < right <= 32


def test_block_box_is_the_common_area_of_the_block() -> None:
    family = MaskFamily.build((24, 24), 3, r=2, mask_stride=2)
    rows, cols = family.grid_shape
    boxes = family.boxes().view(rows, cols, 4)
    for i in range(rows - 1):
        for j in range(cols - 1):
            block = boxes[i:i + 2, j:j + 2].reshape(-1, 4)
            expected = (int(block[:, 0].max()), int(block[:, 1].max()),
                        int(block[:, 2].min()), int(block[:, 3].min()))
            assert family.block_box(i, j) == expected


def test_patch_larger_than_image_is_refused() -> None:
    with pytest.raises(ValueError, match="patch_px"):
        MaskFamily.build((32, 32), 33, masks_per_axis=6)

