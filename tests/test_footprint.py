"""Footprints are exact: pixels inside a window reach exactly foot(window) at layer s.

Soundness (what certification needs): outside the footprint, stem features of a patched image
are bit-for-bit those of the clean image when the stem runs one image at a time. Tightness (so
masks are not needlessly large): every footprint position changes for some perturbation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from support import randomize_batchnorm

from scalecert.geometry import footprint, receptive_field
from scalecert.models import create_model

CONFIGS = [
    ("cifar_resnet20", "relu", 32),
    ("cifar_resnet20", "layer1", 32),
    ("cifar_resnet18", "layer1", 32),
    ("resnet18", "relu", 64),  # ImageNet models at a reduced side: same geometry, faster
    ("resnet18", "maxpool", 64),
    ("resnet18", "layer1", 64),
]


def windows(n: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) boxes, ends exclusive: corner, edges, interior, one pixel,
    and boxes touching the far edges."""
    return [
        (0, 0, 4, 4),  # top-left corner
        (0, 10, 3, 15),  # top edge
        (9, 0, 16, 2),  # left edge
        (12, 9, 17, 20),  # interior
        (n // 2 - 1, n // 2, n // 2, n // 2 + 1),  # a single pixel
        (7, 13, 8, 14),  # another single pixel, odd row / odd column
        (n - 5, n - 3, n, n),  # bottom-right corner
        (5, n - 1, 12, n),  # right edge, one column wide
    ]



def perturbations(shape: torch.Size, trial: int) -> torch.Tensor:
    """Replacement pixels for trial ``trial``: random [0, 1] values, then large magnitudes
    (which survive max-pooling and ReLUs whatever the weights)."""
    generator = torch.Generator().manual_seed(1000 + trial)
    if trial < 3:
        return torch.rand(shape, generator=generator)
    if trial == 3:
        return torch.full(shape, 1e3)
    if trial == 4:
        return torch.full(shape, -1e3)
    return 1e3 * torch.randn(shape, generator=generator)


TRIALS = 6


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Batch-1 stems are tiny: one thread avoids OpenMP barrier stalls on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("name", "layer", "side"), CONFIGS)
def test_footprint_is_exact(name: str, layer: str, side: int, one_thread: None) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = randomize_batchnorm(create_model(name), seed=0).eval()
    split = model.split(layer)
    x = torch.rand(1, 3, side, side, generator=generator)
    with torch.no_grad():
        clean = split.stem(x)
    h, w = clean.shape[-2:]
    for box in windows(side):
        top, left, bottom, right = box
        foot = footprint(split.geometry, (h, w), box)
        assert foot.any(), f"{box} has an empty footprint"
        changed = torch.zeros(h, w, dtype=torch.bool)
        for trial in range(TRIALS):
            patched = x.clone()
            patched[:, :, top:bottom, left:right] = perturbations(
                patched[:, :, top:bottom, left:right].shape, trial
            )
            with torch.no_grad():
                features = split.stem(patched)  # one image at a time, like certification
            assert torch.equal(features[..., ~foot], clean[..., ~foot]), (
                f"{name}@{layer}: features outside foot({box}) changed (trial {trial})"
            )
            changed |= (features != clean).any(dim=1)[0]
        missed = (foot & ~changed).nonzero().tolist()
        assert not missed, f"{name}@{layer}: foot({box}) positions never changed: {missed[:8]}"


def test_receptive_fields_by_hand() -> None:
    """ResNet-18: conv1 7x7/2 p3 reads [2j-3, 2j+3]; max-pool 3x3/2 p1 then reads conv
    positions [2j-1, 2j+1], i.e. pixels [4j-5, 4j+5]; layer1's four 3x3 convs add 4 max-pool
    positions (16 pixels) per side. CIFAR ResNet-20: conv1 plus layer1's six 3x3 convs reach
    7 pixels per side, 15 in all; layer2's first conv has stride 2."""
    imagenet = create_model("resnet18")
    for axis in (0, 1):
        assert receptive_field(imagenet.split("relu").geometry, 0, axis) == (-3, 3)
        assert receptive_field(imagenet.split("relu").geometry, 5, axis) == (7, 13)
        assert receptive_field(imagenet.split("maxpool").geometry, 0, axis) == (-5, 5)
        assert receptive_field(imagenet.split("maxpool").geometry, 3, axis) == (7, 17)
        assert receptive_field(imagenet.split("layer1").geometry, 0, axis) == (-21, 21)
    cifar = create_model("cifar_resnet20")
    lo, hi = receptive_field(cifar.split("layer1").geometry, 10, 0)
    assert (lo, hi) == (3, 17) and hi - lo + 1 == 1 + 2 * 7
    assert receptive_field(cifar.split("relu").geometry, 0, 1) == (-1, 1)
    # layer2 position j: block 0 reads layer1 [2j-3, 2j+3], blocks 1-2 add 4 positions per side
    # at stride 2, layer1 adds 7 pixels: [2j-18, 2j+18].
    assert receptive_field(cifar.split("layer2").geometry, 5, 0) == (-8, 28)


def test_normalisation_over_the_map_is_not_point_wise() -> None:
    """GroupNorm's statistics span every position: a stem holding it has no bounded field."""
    from torch import nn

    from scalecert.errors import InvalidOption
    from scalecert.geometry import geometry_of

    with pytest.raises(InvalidOption, match="GroupNorm"):
        geometry_of(nn.GroupNorm(2, 8))
