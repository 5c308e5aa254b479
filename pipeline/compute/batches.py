"""Decoded images as torch batches: the model's input space, ``N x 3 x H x W`` floats in [0, 1]
(normalisation is the model's first op)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.io.images import Preprocess, read_labelled
from pipeline.io.sources import open_dataset
from pipeline.io.storage import S3Options
from scalecert.errors import InvalidOption


def to_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack ``H x W x 3`` uint8 arrays (all the same shape) into a float32 ``N x 3 x H x W``
    tensor in [0, 1]."""
    if not arrays:
        raise ValueError("to_batch: no arrays")
    first = arrays[0].shape
    for index, array in enumerate(arrays):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"to_batch: array {index} is {array.dtype} {array.shape}, expected uint8 HxWx3"
            )
        if array.shape != first:
            raise ValueError(f"to_batch: array {index} is {array.shape}, array 0 is {first}")
    stacked = torch.from_numpy(np.stack(arrays))  # N x H x W x 3, a fresh writable copy
    return stacked.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def as_arrays(result: Any, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A dataclass of tensors (``CertifyResult``, ``DetectResult``, ``AttackResult``) as numpy
    arrays on the CPU, by field name (``names``: only those): what the torch-free row mappings
    of ``pipeline.io`` take, so the workers convert at their boundary and nowhere else."""
    names = names or tuple(field.name for field in dataclasses.fields(result))
    return {name: getattr(result, name).detach().cpu().numpy() for name in names}


def load_image_folder(
    root: str | Path, limit: int | None = None, per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``root/<class>/<file>`` into ``(images, labels)``, for library use and tests.

    Listed like ``certify`` lists it (class index = sorted folder names, files sorted) and
    decoded by the same :func:`~pipeline.io.images.read_labelled`, without resampling: every
    image must have the size of the first. ``per_class=k`` takes the first k files of every
    class (in class order), then ``limit`` keeps the first ``limit`` of those. An unusable
    image is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidOption(f"data: {root} is not a folder")
    dataset = open_dataset(str(root))
    if not dataset.classes:
        raise InvalidOption(f"data: no class folders under {root}")
    taken: dict[int, int] = {}
    records = []
    for record in dataset.records:
        if per_class is None or taken.get(record.label, 0) < per_class:
            taken[record.label] = taken.get(record.label, 0) + 1
            records.append(record)
    records = records[:limit]
    if not records:
        raise InvalidOption(f"data: no images selected under {root}")
    with Image.open(records[0].location) as first:
        width, height = first.size
    if width != height:
        raise InvalidOption(f"data: {records[0].location} is {width}x{height} px; "
                            "load_image_folder needs square images")
    preprocess = Preprocess("exact", width)
    arrays = []
    for record in records:
        outcome = read_labelled(record, preprocess, num_classes=len(dataset.classes))
        if outcome.pixels is None:
            raise InvalidOption(f"data: {record.location}: {outcome.reason}")
        arrays.append(outcome.pixels)
    labels = torch.tensor([record.label for record in records], dtype=torch.int64)
    return to_batch(arrays), labels


def load_spread(
    source: str, count: int, num_classes: int, preprocess: Preprocess,
    s3: S3Options | None = None, option: str = "data",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labelled images of ``source`` (local or s3://) spread evenly over its sorted
    listing, so that every class is in (the first ``count`` keys would be the first folders
    only), read and preprocessed as ``certify`` does (``preprocess``: the model's,
    ``Preprocess.of(model.preprocessing)``); unusable images are left out. ``option``: the
    flag named when none is usable."""
    records = open_dataset(source, s3=s3).records
    step = max(1, len(records) // count)
    chosen = records[::step][:count]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda r: read_labelled(r, preprocess, num_classes, s3), chosen))
    good = [(record, outcome) for record, outcome in zip(chosen, outcomes)
            if outcome.pixels is not None]
    if not good:
        raise InvalidOption(f"--{option}: none of the {len(chosen)} images read from {source} "
                            "can be used")
    labels = torch.tensor([record.label for record, _ in good], dtype=torch.int64)
    return to_batch([outcome.pixels for _, outcome in good]), labels
