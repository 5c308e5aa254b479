"""A procedural, clearly synthetic labelled image set for the offline demo.

Ten texture classes at 32 x 32 RGB, written as PNG files in the folder layout the pipeline
reads (``root/<split>/<class>/<NNNN>.png``, splits ``train`` and ``test``; the class index is
the position of the folder name in sorted order, as for any image folder).

Every class is a texture that covers the whole image (random period, phase, orientation jitter,
colours, sharpness and pixel noise), so the class can be read from any part of the image: the
defended model sees only the top 15% of its first-layer positions and must still classify with
any 9 x 9 window masked. No class differs from another by a small local feature.

Generation is a pure function of ``seed``: image ``i`` of class ``c`` in split ``s`` is drawn
from its own ``numpy.random.Generator`` seeded with ``(version, seed, s, c, i)``, so the bytes do
not depend on the order of generation, and a larger count only appends images. The dataset is
built in a temporary sibling folder and renamed into place; ``root/synthetic.json`` (written
last) describes it, so an interrupted run is never mistaken for a complete one.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from scalecert.errors import InvalidOption

_FORMAT_NAME = "scalecert-synthetic-textures"
_FORMAT_VERSION = 1
_IMAGE_SIZE = 32
_DESCRIPTION_FILE = "synthetic.json"
_SPLITS = ("train", "test")
_STALE_SECONDS = 3600.0  # a staging folder this old belongs to an interrupted run

_Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


# -- the classes: each returns a foreground weight map t in [0, 1] (H x W) -------------------


def _sharp(s: np.ndarray, rng: np.random.Generator, low: float = 2.0, high: float = 8.0,
           threshold: float = 0.0) -> np.ndarray:
    """Soft threshold of ``s`` at ``threshold``; the edge sharpness is drawn per image."""
    k = rng.uniform(low, high)
    return np.clip(0.5 + k * (s - threshold), 0.0, 1.0)


def _rotate(x: np.ndarray, y: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(degrees)
    return x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)


def _wave(u: np.ndarray, period: float, phase: float) -> np.ndarray:
    return np.cos(2.0 * np.pi * u / period + phase)


def _stripes(angle: float) -> _Pattern:
    def pattern(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        _, v = _rotate(x, y, angle + rng.uniform(-8.0, 8.0))
        s = _wave(v, rng.uniform(4.0, 8.0), rng.uniform(0, 2 * np.pi))
        return _sharp(s, rng, threshold=rng.uniform(-0.3, 0.3))
    return pattern


def _stripes_diagonal(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Both diagonals: a horizontal flip (a standard augmentation) maps one onto the other.
    angle = 45.0 if rng.random() < 0.5 else -45.0
    return _stripes(angle)(rng, x, y)


def _grid_waves(rng: np.random.Generator, x: np.ndarray, y: np.ndarray,
                period_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    u, v = _rotate(x, y, rng.uniform(-8.0, 8.0))
    period = rng.uniform(*period_range)
    return (_wave(u, period, rng.uniform(0, 2 * np.pi)),
            _wave(v, period, rng.uniform(0, 2 * np.pi)))


def _checker(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = _grid_waves(rng, x, y, (5.0, 9.0))
    return _sharp(a * b, rng, 4.0, 12.0)


def _grid(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = _grid_waves(rng, x, y, (5.0, 8.0))
    return _sharp(np.maximum(a, b), rng, 3.0, 8.0, threshold=rng.uniform(0.55, 0.8))


def _dots(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = _grid_waves(rng, x, y, (5.0, 8.0))
    return _sharp(a + b, rng, 2.0, 6.0, threshold=rng.uniform(0.9, 1.3))


def _rings(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy = rng.uniform(4.0, _IMAGE_SIZE - 4.0, size=2)
    r = np.hypot(x - cx, y - cy)
    s = _wave(r, rng.uniform(4.0, 7.0), rng.uniform(0, 2 * np.pi))
    return _sharp(s, rng, threshold=rng.uniform(-0.3, 0.3))


def _blobs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hard-edged irregular blobs: a thresholded sum of random low-frequency waves."""
    s = np.zeros_like(x)
    for _ in range(6):
        angle = rng.uniform(0, 2 * np.pi)
        u = x * math.cos(angle) + y * math.sin(angle)
        s += _wave(u, rng.uniform(9.0, 16.0), rng.uniform(0, 2 * np.pi))
    return _sharp(s / math.sqrt(3.0), rng, 3.0, 10.0, threshold=rng.uniform(-0.2, 0.2))


def _noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-pixel salt-and-pepper in the two colours."""
    return (rng.random(x.shape) < rng.uniform(0.3, 0.7)).astype(np.float64)


def _gradient(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth ramp in a random direction: no edges anywhere."""
    u, _ = _rotate(x, y, rng.uniform(0.0, 360.0))
    span = rng.uniform(1.0, 2.0) * _IMAGE_SIZE
    return np.clip((u - u.mean()) / span + 0.5, 0.0, 1.0)


def _patterns() -> dict[str, _Pattern]:
    return {
        "blobs": _blobs,
        "checker": _checker,
        "dots": _dots,
        "gradient": _gradient,
        "grid": _grid,
        "noise": _noise,
        "rings": _rings,
        "stripes-diagonal": _stripes_diagonal,
        "stripes-horizontal": _stripes(0.0),
        "stripes-vertical": _stripes(90.0),
    }


def synthetic_classes() -> tuple[str, ...]:
    """The class folder names in class-index order (sorted)."""
    return tuple(sorted(_patterns()))


# -- rendering ---------------------------------------------------------------------------------


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours with a luminance contrast of at least 0.3."""
    while True:
        bg, fg = rng.random(3), rng.random(3)
        if abs(_luminance(fg) - _luminance(bg)) >= 0.3:
            return bg, fg


def render_image(class_index: int, seed: int, split: str, index: int) -> np.ndarray:
    """One ``32 x 32 x 3`` uint8 image of class ``class_index``, a pure function of its args."""
    names = synthetic_classes()
    pattern = _patterns()[names[class_index]]
    rng = np.random.default_rng([_FORMAT_VERSION, seed, _SPLITS.index(split), class_index, index])
    y, x = np.mgrid[0:_IMAGE_SIZE, 0:_IMAGE_SIZE].astype(np.float64)
    t = pattern(rng, x, y)[..., None]
    bg, fg = _colours(rng)
    image = bg * (1.0 - t) + fg * t
    image += rng.normal(0.0, rng.uniform(0.01, 0.05), size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", optimize=False, compress_level=6)


# -- the dataset on disk -----------------------------------------------------------------------


def _description(seed: int, train_per_class: int, test_per_class: int) -> dict:
    return {
        "format": _FORMAT_NAME,
        "version": _FORMAT_VERSION,
        "seed": seed,
        "image_size": _IMAGE_SIZE,
        "classes": list(synthetic_classes()),
        "per_class": {"train": train_per_class, "test": test_per_class},
    }


def _file_name(index: int) -> str:
    return f"{index:04d}.png"


def read_description(root: Path) -> dict | None:
    """The ``synthetic.json`` of ``root``, or None when absent or unreadable."""
    try:
        return json.loads((Path(root) / _DESCRIPTION_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, description: dict) -> bool:
    """The description matches and every expected file is present, and nothing else is."""
    if read_description(root) != description:
        return False
    for split in _SPLITS:
        count = description["per_class"][split]
        expected = {_file_name(i) for i in range(count)}
        split_dir = root / split
        try:
            if sorted(p.name for p in split_dir.iterdir()) != list(description["classes"]):
                return False
            for name in description["classes"]:
                if {p.name for p in (split_dir / name).iterdir()} != expected:
                    return False
        except OSError:
            return False
    return True


def _looks_synthetic(root: Path) -> bool:
    """Only what this module writes: the split folders and the description."""
    return all(p.name in (*_SPLITS, _DESCRIPTION_FILE) for p in root.iterdir())


def _remove_stale_siblings(root: Path) -> None:
    """Leftovers of interrupted runs: ``.<name>.old-*`` always, ``.<name>.tmp-*`` once old."""
    now = time.time()
    for path in root.parent.glob(f".{glob.escape(root.name)}.*-*"):
        kind = path.name[len(root.name) + 2:].split("-", 1)[0]
        try:
            stale = kind == "old" or (kind == "tmp" and now - path.stat().st_mtime > _STALE_SECONDS)
        except OSError:
            continue
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def write_synthetic_dataset(
    root: Path, train_per_class: int = 300, test_per_class: int = 50, seed: int = 0
) -> Path:
    """Write the synthetic texture set under ``root`` (unless it is already there) and return
    ``root``.

    Layout: ``root/{train,test}/<class>/<NNNN>.png`` and ``root/synthetic.json``. A complete
    set with the same description (format version, seed, counts) is left untouched. Otherwise
    the set is built in a temporary sibling folder and renamed over ``root``; a ``root`` holding
    anything other than a previous synthetic set is refused rather than replaced.
    """
    root = Path(root)
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9999:
            raise InvalidOption(f"{name}: must be an integer in [1, 9999], got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidOption(f"seed: must be an integer >= 0, got {seed!r}")
    description = _description(seed, train_per_class, test_per_class)
    if root.is_dir() and _is_complete(root, description):
        return root
    if root.exists() and not (root.is_dir() and _looks_synthetic(root)):
        raise InvalidOption(
            f"root: {root} exists and is not a synthetic dataset folder; refusing to replace it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(root)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        counts = {"train": train_per_class, "test": test_per_class}
        for split in _SPLITS:
            for class_index, name in enumerate(synthetic_classes()):
                folder = staging / split / name
                folder.mkdir(parents=True)
                for index in range(counts[split]):
                    _write_png(folder / _file_name(index),
                               render_image(class_index, seed, split, index))
        text = json.dumps(description, indent=2, sort_keys=True) + "\n"
        (staging / _DESCRIPTION_FILE).write_text(text)
        os.chmod(staging, 0o755)  # mkdtemp creates it 0700
        if root.exists():
            # Move the stale set aside first (one rename), so root is never half old, half new.
            trash = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
            os.replace(root, trash / "old")
            os.replace(staging, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root
