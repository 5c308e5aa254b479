"""Shared helpers for the benchmark scripts: real CIFAR-10 data from ../shared."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

import torch

from pipeline.compute.batches import load_image_folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET20 = SHARED / "models" / "cifar10-resnet20-akamaster.th"


def cifar10_folder(split: str, per_class: int) -> Path:
    """A temporary class folder (``<class>/NNNN.jpg``) holding the first ``per_class`` JPEGs of
    each class of the shared CIFAR-10 ``split``, as they are in the archive."""
    archive = SHARED / "data" / "cifar10" / f"{split}.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"{archive} not found: the benchmarks need ../shared (see README)")
    workdir = Path(tempfile.mkdtemp(prefix="scalecert-bench-"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and int(Path(m.name).stem) < per_class]
        tar.extractall(workdir, members=members, filter="data")
    return workdir / split


def class_subset(source: Path, per_class: int) -> Path:
    """A temporary copy of the first ``per_class`` files (sorted) of every class folder."""
    target = Path(tempfile.mkdtemp(prefix="scalecert-bench-")) / source.name
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for path in sorted(p for p in folder.iterdir() if p.is_file())[:per_class]:
            shutil.copy(path, target / folder.name / path.name)
    return target


def cifar10_split(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class of the shared CIFAR-10 JPEG ``split``."""
    return load_image_folder(cifar10_folder(split, per_class), per_class=per_class)
