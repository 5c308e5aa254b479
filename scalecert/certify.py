"""Stage 3, detection and certification, batched: one front door for every method.

A :class:`Certifier` builds the configured method (its module's ``build``, through the
registry) and drives it through the :class:`~scalecert.methods.base.Method` protocol: prepare
each chunk of images once, then the method's rule on the chunk, with the (image, window) pairs
of many images sharing g's batches (:class:`~scalecert.pairs.PairRunner`, on the fast path).
What a certificate means is the method's: certified detection (a certified image is labelled
right or ALERT under any patch, :mod:`scalecert.methods.detection`) or certified recovery
(labelled right, :mod:`scalecert.methods.patchcleanser`). :class:`CertifierGroup` certifies the
same images under several settings, sharing what their methods' preparation keys allow.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.masks import MaskFamily
from scalecert.methods import load_method
from scalecert.methods.base import (
    ALERT,
    NOT_EVALUATED,
    Evaluation,
    MaskedPredictor,
    Method,
    PreparedBatch,
)
from scalecert.models.base import StagedClassifier
from scalecert.pairs import PairRunner
from scalecert.precision import FastPath, GRunner

__all__ = [
    "ALERT", "NOT_EVALUATED", "Certifier", "CertifierGroup", "CertifyResult", "DetectResult",
    "GroupOutcome", "certify_many", "check_images", "default_batch_size",
]


@dataclass(frozen=True)
class DetectResult:
    """Detection on N images. ``output`` is the label or -1 (ALERT)."""

    output: torch.Tensor  # N int64
    prediction: torch.Tensor  # N int64, M(z)
    alert_box: torch.Tensor  # N x 4 int64, (top, left, bottom, right); -1 rows: no box
    recovered_prediction: torch.Tensor  # N int64, -1 where none (not an alert with a box)
    mask_predictions: torch.Tensor  # N x n_masks int64 (skipped: M(z); unrun: NOT_EVALUATED)
    n_evaluated: torch.Tensor  # N int64, masks that needed a run of g


@dataclass(frozen=True)
class CertifyResult:
    """Certificates of N labelled images, and detection on the same (clean) images."""

    prediction: torch.Tensor  # N int64, M(x): the defended (pruned) model's prediction
    vanilla_prediction: torch.Tensor  # N int64, the undefended model's prediction
    certified: torch.Tensor  # N bool
    n_masks: torch.Tensor  # N int64
    n_evaluated: torch.Tensor  # N int64
    min_margin: torch.Tensor  # N float32: min over computed predictions of logit[y] - max other
    mask_predictions: torch.Tensor  # N x n_masks int64
    clean_output: torch.Tensor  # N int64: detect(x), the label or -1 (ALERT)
    alert_box: torch.Tensor  # N x 4 int64, -1 rows where detect(x) raised no located alert
    recovered_prediction: torch.Tensor  # N int64, -1 where none
    # N float32, detection methods (NaN for recovery): the least softmax confidence of a
    # window's prediction, and the largest of a window disagreeing with M(x) (0: none). With
    # the full map they give the certificate and the clean detection at any alert confidence
    # TAU: certified(TAU) = certified and min_confidence >= TAU + margin / 2; ALERT on the
    # clean image iff max_alert_confidence >= TAU (work avoidance: over the windows run).
    min_confidence: torch.Tensor
    max_alert_confidence: torch.Tensor


def default_batch_size(device: str | torch.device) -> int:
    """(image, window) pairs per run of g when none is asked for: 256 on CUDA, 64 on a CPU,
    where g's activations then stay in cache (ResNet-20's g alone ran about 1.5x faster at 64
    than at 256 on 2 cores)."""
    return 256 if torch.device(device).type == "cuda" else 64


class Certifier:
    """Certifies and detects with one model and one :class:`CertConfig`.

    ``batch_size`` is the number of (image, window) pairs per run of g (None: the device's
    :func:`default_batch_size`); ``image_chunk`` bounds how many images' prepared state (stem
    features) is held at once. ``full_map=True`` (default) runs every window (pair) the
    predictor does not spare, for audits; ``full_map=False`` turns on the method's work
    avoidance, which leaves certificates and clean outputs unchanged (unrun windows read
    NOT_EVALUATED in ``mask_predictions``). The model itself is moved to ``device``, converted
    to channels_last and put in eval mode.

    ``fast`` chooses how g runs (:class:`~scalecert.precision.FastPath`): eager fp32 by
    default; bf16 autocast and/or ``torch.compile`` with close calls re-run in eager fp32, so
    that predictions and certified / not certified equal the fp32 path's. The stem always runs
    in eager fp32. ``runner.pairs`` and ``runner.rechecked`` count g's rows and the re-runs.
    """

    def __init__(
        self,
        model: StagedClassifier,
        config: CertConfig,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        image_chunk: int = 256,
        full_map: bool = True,
        fast: FastPath = FastPath(),
    ) -> None:
        batch_size = default_batch_size(device) if batch_size is None else batch_size
        if batch_size < 1 or image_chunk < 1:
            raise InvalidOption("batch_size and image_chunk must be >= 1")
        self.config = config
        self.device = torch.device(device)
        # channels_last: about 1.8x faster convolutions on CPU (measured), and the GPU default
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.batch_size = batch_size
        self.image_chunk = image_chunk
        self.full_map = full_map
        self.fast = fast
        self.method: Method = load_method(config.method).build(self.model, config)
        # the alert-confidence rule decides on TAU (alerts) and TAU + margin / 2 (certificates)
        levels = (() if config.alert_confidence is None
                  else (config.alert_confidence, config.certificate_confidence))
        self.runner = GRunner(self.predictor.g, fast, config.margin, self.device, batch_size,
                              confidence_levels=levels)
        self.pairs = PairRunner(self.predictor, self.runner, batch_size, model.num_classes,
                                config.margin)

    @property
    def predictor(self) -> MaskedPredictor:
        """The method's F(x, m)."""
        return self.method.predictor

    def mask_family(self, height: int, width: int | None = None) -> MaskFamily:
        cfg = self.config
        return MaskFamily.build(
            (height, height if width is None else width), cfg.patch_px, cfg.r,
            mask_stride=cfg.mask_stride, masks_per_axis=cfg.masks_per_axis,
            layout=cfg.window_layout,
        )

    def mask_boxes(self, height: int, width: int | None = None) -> torch.Tensor:
        """``n_masks x 4`` (top, left, bottom, right) windows, in ``mask_predictions`` order."""
        return self.mask_family(height, width).boxes()

    @property
    def preparation_key(self) -> Hashable:
        """Certifiers with equal keys can share :meth:`prepare` results (and the M(x) they
        memoise), e.g. several patch sizes of one run: the stem runs once per image. The
        model object and the method's own key (what its prepared state and g depend on)."""
        return (id(self.model), self.method.preparation_key)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> PreparedBatch:
        """Per-image work shared by every window (the stem and SIN selection for scalecert)."""
        check_images(images)
        self.check_fits(images)
        return self.predictor.prepare(images.to(self.device))

    @torch.no_grad()
    def certify(
        self, images: torch.Tensor, labels: torch.Tensor, prepared: PreparedBatch | None = None
    ) -> CertifyResult:
        """Certificates for labelled images (``N x 3 x H x W`` floats in [0, 1], ``N`` ints).

        ``prepared``: the result of :meth:`prepare` on the same images, from this certifier or
        one with the same :attr:`preparation_key`, to skip that work.
        """
        check_images(images)
        self.check_fits(images)
        labels = check_labels(labels, len(images), self.model.num_classes)
        evaluation = self._evaluate(images, labels, prepared)
        n = len(images)
        return CertifyResult(
            prediction=evaluation.base,
            vanilla_prediction=evaluation.vanilla,
            certified=evaluation.certified,
            n_masks=torch.full((n,), evaluation.mask_predictions.shape[1], dtype=torch.int64),
            n_evaluated=evaluation.n_evaluated,
            min_margin=evaluation.min_margin,
            mask_predictions=evaluation.mask_predictions,
            clean_output=evaluation.output,
            alert_box=evaluation.alert_box,
            recovered_prediction=evaluation.recovered,
            min_confidence=evaluation.min_confidence,
            max_alert_confidence=evaluation.max_alert_confidence,
        )

    @torch.no_grad()
    def detect(self, images: torch.Tensor, prepared: PreparedBatch | None = None) -> DetectResult:
        """The method's rule on possibly patched images: the label, or -1 (ALERT) with a
        location (detection methods)."""
        check_images(images)
        self.check_fits(images)
        evaluation = self._evaluate(images, None, prepared)
        return DetectResult(
            output=evaluation.output,
            prediction=evaluation.base,
            alert_box=evaluation.alert_box,
            recovered_prediction=evaluation.recovered,
            mask_predictions=evaluation.mask_predictions,
            n_evaluated=evaluation.n_evaluated,
        )

    def check_fits(self, images: torch.Tensor) -> None:
        """Refuse images whose sides cannot hold this certifier's patch (reads the shape)."""
        height, width = images.shape[2:]
        if self.config.patch_px > min(height, width):
            raise InvalidOption(
                f"patch_px: a {self.config.patch_px} px patch is larger than the images "
                f"({height}x{width})"
            )

    def _evaluate(
        self, images: torch.Tensor, labels: torch.Tensor | None, prepared: PreparedBatch | None
    ) -> Evaluation:
        if prepared is not None and len(prepared) != len(images):
            raise InvalidOption(f"prepared: holds {len(prepared)} images, not {len(images)}")
        family = self.mask_family(images.shape[2], images.shape[3])
        parts = []
        for start in range(0, len(images), self.image_chunk):
            rows = slice(start, start + self.image_chunk)
            batch = (self.predictor.prepare(images[rows].to(self.device)) if prepared is None
                     else prepared.select(rows))
            parts.append(self.method.evaluate(
                batch, None if labels is None else labels[rows], family, self.pairs,
                self.full_map))
        return Evaluation(*(
            torch.cat([getattr(part, field.name) for part in parts])
            for field in fields(Evaluation)
        ))


def check_labels(labels: Any, count: int, num_classes: int) -> torch.Tensor:
    """``count`` integer labels in [0, num_classes), as int64 on the CPU (else
    :class:`InvalidOption` naming ``labels``)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != count:
        raise InvalidOption(f"labels: expected {count} labels, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidOption(f"labels: expected integers, got dtype {labels.dtype}")
    labels = labels.to(torch.int64).cpu()
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise InvalidOption(
            f"labels: values must lie in [0, {num_classes}), got {labels.tolist()[:10]}")
    return labels


def check_images(images: Any) -> None:
    """Refuse anything but a non-empty ``N x 3 x H x W`` float batch with values in [0, 1]
    (:class:`InvalidOption` naming ``images``); one pass over the pixels for both ends of
    the range."""
    if not isinstance(images, torch.Tensor):
        raise InvalidOption(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InvalidOption(f"images: expected shape N x 3 x H x W, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InvalidOption(f"images: expected floats in [0, 1], got dtype {images.dtype}")
    if len(images) == 0:
        raise InvalidOption("images: the batch is empty")
    low, high = (float(end) for end in torch.aminmax(images))
    if not (0.0 <= low and high <= 1.0):  # also false for NaN
        raise InvalidOption(f"images: values must lie in [0, 1], got [{low}, {high}]")


@dataclass(frozen=True)
class GroupOutcome:
    """One setting's certificates from :meth:`CertifierGroup.certify`, and the seconds its
    own share of the work took (the shared stem and M(x) count towards the first setting
    that needed them)."""

    config: CertConfig
    result: CertifyResult
    seconds: float


class CertifierGroup:
    """Several certification settings for one model (a run's patch sizes and methods),
    certifying the same images together: each image's stem features and M(x) are computed once
    for all the settings that share them (equal :attr:`Certifier.preparation_key`).

    ``certifier_options`` are :class:`Certifier`'s keyword arguments (device, batch size,
    work avoidance, fast path) and apply to every setting.
    """

    def __init__(
        self, model: StagedClassifier, configs: Sequence[CertConfig], **certifier_options: Any
    ) -> None:
        if not configs:
            raise InvalidOption("configs: give at least one CertConfig")
        self.certifiers = tuple(Certifier(model, config, **certifier_options) for config in configs)

    @torch.no_grad()
    def certify(self, images: torch.Tensor, labels: torch.Tensor) -> list[GroupOutcome]:
        """Certificates of ``images`` under every setting, in the order of ``configs``.

        The images, the labels and every setting's patch are checked before any work, so a
        bad input is refused before the first setting runs."""
        check_images(images)
        for certifier in self.certifiers:
            certifier.check_fits(images)
        check_labels(labels, len(images), self.certifiers[0].model.num_classes)
        prepared: dict[Hashable, PreparedBatch] = {}
        outcomes = []
        for certifier in self.certifiers:
            began = time.perf_counter()
            key = certifier.preparation_key
            if key not in prepared:
                prepared[key] = certifier.prepare(images)
            result = certifier.certify(images, labels, prepared[key])
            outcomes.append(GroupOutcome(certifier.config, result, time.perf_counter() - began))
        return outcomes


def certify_many(
    model: StagedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    configs: Sequence[CertConfig],
    **certifier_options: Any,
) -> list[CertifyResult]:
    """Certificates of ``images`` under each of ``configs``, sharing stem features and M(x)
    between the settings that allow it (:class:`CertifierGroup`); ``certifier_options`` are
    :class:`Certifier`'s keyword arguments."""
    group = CertifierGroup(model, configs, **certifier_options)
    return [outcome.result for outcome in group.certify(images, labels)]
