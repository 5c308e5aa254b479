"""Fine-tuning for the defended forward pass (the paper's winner-take-all dropout).

ScaleCert trains the model it certifies: F(x, m) with SIN pruning in the forward pass, under a
random window of the mask family or none, so that only the kept features carry gradient and the
head learns to classify from k positions. The `masking` control trains the unpruned model on
images with a random window occluded, so both defenses get the same budget.

One epoch is :func:`train_epoch`, run by the single-device loop (:func:`finetune`) and by the
distributed trainer (``pipeline/train/trainer.py``) alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.masks import MaskFamily
from scalecert.methods import load_method
from scalecert.models.base import StagedClassifier


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune for one certification setting (``cert``: method, top_k, layer, masks).

    mask_probability: share of training images seen under a random window of the family (the
        rest see no window, i.e. M(x)). lr follows a cosine schedule over all steps.
    augment: random 4-pixel-padded crops and horizontal flips (CIFAR-style).
    objective: "random-window" (the loss under the sampled window, or none) or "worst-window"
        (the loss on the image without a window plus the loss under the window of the family
        that the current model gets most wrong, found by a no-grad pass over every window in
        eval mode; ``mask_probability`` is then unused). The certificate needs every window
        right, which the worst window targets; each step costs one forward per window more.
    """

    cert: CertConfig
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mask_probability: float = 0.5
    augment: bool = True
    seed: int = 0
    objective: str = "random-window"

    def __post_init__(self) -> None:
        if not isinstance(self.cert, CertConfig):
            raise InvalidOption(f"cert: expected a CertConfig, got {type(self.cert).__name__}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOption(f"{name}: must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOption(f"lr: must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidOption(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0.0:
            raise InvalidOption(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise InvalidOption(f"mask_probability: must be in [0, 1], got {self.mask_probability!r}")
        if self.objective not in OBJECTIVES:
            raise InvalidOption(
                f"objective: one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.objective == "random-window":  # earlier runs' records and fingerprints hold
            del values["objective"]
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


OBJECTIVES = ("random-window", "worst-window")


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    loss: float
    accuracy: float  # training accuracy of the defended forward pass (under the sampled windows)
    images: int


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops from a 4-pixel zero-padded copy, and horizontal flips."""
    n, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    tops = torch.randint(0, 9, (n,), generator=generator).tolist()
    lefts = torch.randint(0, 9, (n,), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.stack([
        padded[i, :, t:t + height, l:l + width] for i, (t, l) in enumerate(zip(tops, lefts))
    ])
    flip_index = torch.tensor([i for i, f in enumerate(flips) if f], dtype=torch.int64)
    if len(flip_index):
        out[flip_index] = out[flip_index].flip(-1)
    return out


def sample_windows(
    count: int, boxes: torch.Tensor, mask_probability: float, generator: torch.Generator
) -> torch.Tensor:
    """``count x 4`` boxes: a random window of the family, or the empty box (no mask)."""
    chosen = boxes[torch.randint(0, len(boxes), (count,), generator=generator)]
    unmasked = torch.rand(count, generator=generator) >= mask_probability
    chosen[unmasked] = 0
    return chosen


def defended_logits(
    model: StagedClassifier, cert: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Logits of the defended forward pass under ``windows`` (one box per image; empty: none):
    the method's own (``defended_logits`` of its module in :mod:`scalecert.methods`)."""
    return load_method(cert.method).defended_logits(model, cert, images, windows)


class DefendedForward(nn.Module):
    """``model`` under the defended forward pass as one module, ``forward(images, windows)``.

    Distributed data-parallel training must call the wrapped module's own ``forward`` for its
    gradient hooks to fire, so the trainer wraps this (not the stem and head separately).
    """

    def __init__(self, model: StagedClassifier, cert: CertConfig) -> None:
        super().__init__()
        self.model = model
        self.cert = cert

    def forward(self, images: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        return defended_logits(self.model, self.cert, images, windows)


@torch.no_grad()
def worst_windows(
    forward: nn.Module, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
    images_per_pass: int | None = None,
) -> torch.Tensor:
    """For each image, the window of ``boxes`` under which ``forward`` has the highest loss
    (``N x 4``), computed in eval mode (the search must not move BatchNorm statistics); the
    module's training mode is restored.

    Several windows share one forward pass (the batch repeated once per window, at most
    ``images_per_pass`` rows): eval-mode BatchNorm and SIN pruning act on each row alone, so
    this equals one pass per window, with fewer and larger kernels. None: 4096 rows on a GPU
    (the family in a few passes instead of one per window), one window a pass on a CPU (where
    the larger passes measured about 30% slower)."""
    if images_per_pass is None:
        images_per_pass = 4096 if images.is_cuda else max(1, len(images))
    if images_per_pass < 1:
        raise InvalidOption(f"images_per_pass: must be >= 1, got {images_per_pass!r}")
    count = len(images)
    per_pass = max(1, images_per_pass // max(1, count))
    was_training = forward.training
    forward.eval()
    try:
        losses = []
        for start in range(0, len(boxes), per_pass):
            chunk = boxes[start:start + per_pass]
            windows = chunk.repeat_interleave(count, dim=0)
            logits = forward(images.repeat(len(chunk), 1, 1, 1), windows)
            loss = F.cross_entropy(logits, labels.repeat(len(chunk)), reduction="none")
            losses.append(loss.view(len(chunk), count).T)
    finally:
        forward.train(was_training)
    return boxes[torch.cat(losses, dim=1).argmax(dim=1).cpu()]


def training_windows(cert: CertConfig, image_hw: tuple[int, int]) -> torch.Tensor:
    """The windows training samples from: the certification mask family's boxes."""
    return MaskFamily.build(image_hw, cert.patch_px, cert.r, mask_stride=cert.mask_stride,
                            masks_per_axis=cert.masks_per_axis,
                            layout=cert.window_layout).boxes()


def sgd_with_cosine_schedule(
    parameters: Iterable[nn.Parameter], config: FinetuneConfig, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """SGD with momentum and weight decay, its learning rate on a cosine over all steps."""
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch)
    return optimizer, schedule


@dataclass(frozen=True)
class EpochTotals:
    """What one worker's epoch summed: loss x images, correct predictions, images."""

    loss_sum: float
    correct: int
    images: int


def train_epoch(
    forward: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    boxes: torch.Tensor,
    config: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
) -> EpochTotals:
    """One epoch of the defended forward pass: batches of ``batch_size`` images taken in
    ``order`` (indices into ``images``, uint8 or floats in [0, 1]), each augmented and put
    under windows sampled from ``boxes`` with ``generator``, one SGD step each.

    ``forward`` is :class:`DefendedForward` or a wrapper of it (DDP): the one-device loop
    (:func:`finetune`) and the Ray Train worker both run their epochs here. ``on_step(step,
    steps)`` is called after each optimiser step."""
    steps = math.ceil(len(order) / batch_size)
    loss_sum, correct = 0.0, 0
    for step in range(steps):
        index = order[step * batch_size:(step + 1) * batch_size]
        batch = images[index]
        if not batch.is_floating_point():
            batch = batch.float().div_(255.0)
        if config.augment:
            batch = augment(batch, generator)
        target = labels[index].to(device)
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        if config.objective == "worst-window":
            worst = worst_windows(forward, batch, target, boxes)
            logits = forward(batch, torch.zeros_like(worst))
            loss = F.cross_entropy(logits, target) + F.cross_entropy(forward(batch, worst),
                                                                     target)
        else:
            windows = sample_windows(len(index), boxes, config.mask_probability, generator)
            logits = forward(batch, windows)
            loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += float(loss.detach()) * len(index)
        correct += int((logits.argmax(dim=1) == target).sum())
        if on_step is not None:
            on_step(step + 1, steps)
    return EpochTotals(loss_sum, correct, len(order))


def finetune(
    model: StagedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> list[EpochMetrics]:
    """Fine-tune ``model`` in place on ``images`` (N x 3 x H x W in [0, 1]) and ``labels``.

    Plain SGD with momentum and a cosine learning-rate schedule on one device. Returns the
    per-epoch metrics (also passed to ``on_epoch`` as each epoch ends) and leaves the model in
    eval mode.
    """
    if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
        raise InvalidOption(
            f"images, labels: expected N x 3 x H x W images and N labels, got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    cert = config.cert
    device = torch.device(device)
    model.to(device, memory_format=torch.channels_last).train()
    if cert.layer is not None:  # refuse an unknown layer before any work
        model.split(cert.layer)
    forward = DefendedForward(model, cert)
    boxes = training_windows(cert, tuple(images.shape[2:]))
    generator = torch.Generator().manual_seed(config.seed)
    optimizer, schedule = sgd_with_cosine_schedule(
        model.parameters(), config, steps_per_epoch=math.ceil(len(images) / config.batch_size))
    history = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(images), generator=generator)
        totals = train_epoch(forward, images, labels, order, config.batch_size, boxes, config,
                             optimizer, schedule, generator, device)
        metrics = EpochMetrics(epoch, totals.loss_sum / totals.images,
                               totals.correct / totals.images, totals.images)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    model.eval()
    return history
