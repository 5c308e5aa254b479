"""Shared helpers for the benchmark scripts: real CIFAR-10 data from ../shared."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import torch

from pipeline.data import load_image_folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET20 = SHARED / "models" / "cifar10-resnet20-akamaster.th"


def cifar10_split(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class of the shared CIFAR-10 JPEG ``split``."""
    archive = SHARED / "data" / "cifar10" / f"{split}.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"{archive} not found: the benchmarks need ../shared (see README)")
    workdir = Path(tempfile.mkdtemp(prefix="scalecert-bench-"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and int(Path(m.name).stem) < per_class]
        tar.extractall(workdir, members=members, filter="data")
    return load_image_folder(workdir / split, per_class=per_class)
