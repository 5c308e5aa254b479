"""Labelled image folders: ``root/<class>/<image>``, class index = sorted folder names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image_folder(
    root: str | Path, limit: int | None = None, per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``root/<class>/<file>`` into ``(images, labels)``.

    Images are float32 ``N x 3 x H x W`` in [0, 1] (all the same size), labels int64; the class
    index is the position of the folder name in sorted order and files are sorted, so the
    selection is deterministic: ``per_class=k`` takes the first k files of every class (in class
    order), then ``limit`` keeps the first ``limit`` of those.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data: no class folders under {root}")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        members = sorted(p for p in (root / name).iterdir() if p.is_file())
        files += [(p, index) for p in members[:per_class]]
    files = files[:limit]
    if not files:
        raise ValueError(f"data: no images selected under {root}")
    arrays = []
    for path, _ in files:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    stacked = np.stack(arrays)  # N x H x W x 3, uint8
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return images, labels
