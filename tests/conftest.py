"""Fixtures for the real data and weights in ``../shared`` (skipped when it is absent)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared``: test data and reference weights, never part of the repository."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared not found: real data and weights live there (see README)")
    return path


@pytest.fixture(scope="session")
def cifar10_test_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10,000 CIFAR-10 test JPEGs, extracted once per session: ``test/<class>/NNNN.jpg``."""
    archive = shared_dir / "data" / "cifar10" / "test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found (see ../shared/data/README.md)")
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    test_dir = target / "test"
    assert test_dir.is_dir(), f"{archive} has no test/ folder"
    return test_dir


def _checkpoint(shared_dir: Path, name: str) -> Path:
    path = shared_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not found (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def resnet20_checkpoint(shared_dir: Path) -> Path:
    """The akamaster CIFAR-10 ResNet-20 checkpoint (91.78% on the original test set)."""
    return _checkpoint(shared_dir, "cifar10-resnet20-akamaster.th")


@pytest.fixture(scope="session")
def resnet56_checkpoint(shared_dir: Path) -> Path:
    """The akamaster CIFAR-10 ResNet-56 checkpoint (93.62% on the original test set)."""
    return _checkpoint(shared_dir, "cifar10-resnet56-akamaster.th")
