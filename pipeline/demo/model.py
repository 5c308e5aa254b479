"""The model of the offline demo: a CIFAR ResNet-20 trained from random initialisation on the
synthetic texture set (:mod:`pipeline.demo.synthetic`) with the project's own winner-take-all
fine-tuning (:func:`scalecert.training.finetune`), so that `make demo` needs neither network nor
downloaded weights.

Training runs with SIN pruning in the forward pass under random windows of the very mask family
that is certified later (:func:`demo_cert_config`), which is what makes the pruned model both
accurate and certifiable. The result is a plain checkpoint plus JSON sidecar
(:func:`scalecert.models.save_checkpoint`); training is skipped when both exist and the sidecar
records the same model, fine-tuning config and training data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

import scalecert
from pipeline.compute.batches import load_image_folder
from scalecert import CertConfig, create_model
from scalecert.errors import InvalidOption
from scalecert.models import save_checkpoint
from scalecert.training import EpochMetrics, FinetuneConfig, finetune

_MODEL = "cifar_resnet20"
_SIDECAR_FORMAT = "scalecert-demo-model"
# 4 epochs of the 3000 default training images: on the 500 test images 98.8% pruned and 95.8%
# certified accuracy (6 epochs: 99.0% and 97.8%, for half as much time again).
_EPOCHS = 4


def demo_cert_config() -> CertConfig:
    """The demo's certification setting: 5 px patches (2.4% of 32 x 32), top 15% of the
    first-layer positions kept, a 6 x 6 grid of 9 x 9 windows."""
    return CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6)


def demo_finetune_config(epochs: int = _EPOCHS, seed: int = 0) -> FinetuneConfig:
    """The demo's training setting: winner-take-all SIN training from scratch.

    SGD (lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule), batches of 128, half the
    images under a random window of the certified family, CIFAR-style crops and flips (every
    synthetic class is closed under horizontal flips).
    """
    return FinetuneConfig(
        cert=demo_cert_config(),
        epochs=epochs,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        mask_probability=0.5,
        augment=True,
        seed=seed,
    )


def _data_description(data_root: Path, train_dir: Path) -> dict:
    """What identifies the training data: the synthetic set's own description when there is
    one, and the class folders with their file counts."""
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    counts = {name: sum(1 for p in (train_dir / name).iterdir() if p.is_file()) for name in classes}
    try:
        synthetic = json.loads((data_root / "synthetic.json").read_text())
    except (OSError, ValueError):
        synthetic = None
    return {"split": "train", "classes": classes, "counts": counts, "synthetic": synthetic}


def _identity(finetune_config: FinetuneConfig, data: dict) -> dict:
    """The sidecar fields that must match for a checkpoint to be reused."""
    return {
        "format": _SIDECAR_FORMAT,
        "model": _MODEL,
        "finetune_config": finetune_config.to_dict(),
        "data": data,
    }


def _matches(checkpoint: Path, identity: dict) -> bool:
    sidecar = Path(f"{checkpoint}.json")
    if not (checkpoint.is_file() and sidecar.is_file()):
        return False
    try:
        recorded = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    # Round-trip through JSON so tuples and lists compare alike.
    expected = json.loads(json.dumps(identity))
    return all(recorded.get(key) == value for key, value in expected.items())


def train_demo_model(
    data_root: Path,
    checkpoint: Path,
    epochs: int = _EPOCHS,
    seed: int = 0,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> Path:
    """Train the demo ResNet-20 on ``data_root/train`` and save it to ``checkpoint`` (plus
    ``checkpoint.json``); return ``checkpoint``.

    ``data_root`` is a dataset root with a ``train/<class>/<image>`` split, as written by
    :func:`pipeline.demo.synthetic.write_synthetic_dataset`. Nothing is trained when the checkpoint
    and a sidecar with the same model, config and data already exist. ``on_epoch`` receives each
    epoch's :class:`~scalecert.training.EpochMetrics` as it ends. Training runs on the CPU
    with torch's current thread setting (the caller decides ``torch.set_num_threads``).
    """
    data_root, checkpoint = Path(data_root), Path(checkpoint)
    train_dir = data_root / "train"
    if not train_dir.is_dir():
        raise InvalidOption(f"data_root: {data_root} has no train/ folder")
    config = demo_finetune_config(epochs, seed)
    identity = _identity(config, _data_description(data_root, train_dir))
    if _matches(checkpoint, identity):
        return checkpoint

    images, labels = load_image_folder(train_dir)
    num_classes = len(identity["data"]["classes"])
    torch.manual_seed(seed)
    model = create_model(_MODEL, num_classes=num_classes)
    start = time.perf_counter()
    history = finetune(model, images, labels, config, on_epoch=on_epoch)
    seconds = time.perf_counter() - start

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        **identity,
        "num_classes": num_classes,
        "scalecert_version": scalecert.__version__,
        "train_images": len(images),
        "train_seconds": round(seconds, 3),
        "torch_threads": torch.get_num_threads(),
        "epochs": [
            {"epoch": m.epoch, "loss": m.loss, "accuracy": m.accuracy, "images": m.images}
            for m in history
        ],
    }
    save_checkpoint(model, checkpoint, metadata)
    return checkpoint
