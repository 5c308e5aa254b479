"""What every method module provides, and what the certifier gives it.

A method (:class:`Method`) owns the predictor F(x, m) it certifies with, the per-image state it
prepares once (and the key under which it may share that state with other methods of a run),
and the rule that turns one chunk's predictions into outputs and certificates
(:meth:`Method.evaluate`). :class:`~scalecert.certify.Certifier` drives every method through
this protocol alone; it supplies a :class:`Pairs` service that runs (image, window) pairs
through the method's network g in shared batches, on the run's fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from scalecert.config import CertConfig
from scalecert.masks import MaskFamily

ALERT = -1  # detection's output when it raises an alert
NOT_EVALUATED = -2  # mask_predictions entry of a window left unrun (work avoidance)
NO_MAJORITY = -3  # block_votes entry of a block without a strict majority
NO_BOX = (-1, -1, -1, -1)  # alert_box row without a located alert
EMPTY_BOX = (0, 0, 0, 0)  # a window that masks nothing: F(x, EMPTY_BOX) is M(x)


class PreparedBatch(Protocol):
    """Per-image state a predictor computes once (stem features, or the images themselves).

    ``memo`` holds results that do not depend on the window family, such as M(x), for every
    certifier that shares this batch (several patch sizes of one run); :meth:`select` of the same
    rows returns the same child memo."""

    memo: dict

    def __len__(self) -> int: ...

    def select(self, rows: slice) -> "PreparedBatch":
        """The state of a contiguous range of the images."""
        ...


class MaskedPredictor(Protocol):
    """Predictions of a defended model under windows, for pairs of (image, box)."""

    def prepare(self, images: torch.Tensor) -> PreparedBatch:
        """Per-image work done once: ``images`` is ``B x 3 x H x W`` in [0, 1] on the device."""
        ...

    def evaluation_priority(self, batch: PreparedBatch, boxes: torch.Tensor) -> torch.Tensor:
        """``B x M`` non-negative floats: 0 where F(x, box) provably equals the unmasked
        prediction (no run needed); otherwise higher means more likely to change it."""
        ...

    @property
    def g(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network every pair runs through (scalecert's head, masking's whole model)."""
        ...

    def g_inputs(
        self, batch: PreparedBatch, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """g's input for each pair (image_index_i, boxes_i). ``boxes`` is ``E x 4`` (one
        window per input) or ``E x J x 4`` (the union of J windows is masked: PatchCleanser's
        two-mask inputs); an empty box masks nothing."""
        ...

    def unmasked_inputs(self, batch: PreparedBatch) -> torch.Tensor:
        """g's input for each image without mask or pruning: g of it is the undefended model."""
        ...


@dataclass(frozen=True)
class Runs:
    """Predictions of g on some pairs, their margins and their softmax confidences."""

    predictions: torch.Tensor
    margins: torch.Tensor
    confidences: torch.Tensor


class Pairs(Protocol):
    """The certifier's service to a method: g on (image, window) pairs in shared batches."""

    batch_size: int  # pairs per run of g: a method batching its own rounds aims at it
    num_classes: int

    def run(self, batch: PreparedBatch, image_index: torch.Tensor, boxes: torch.Tensor,
            labels: torch.Tensor | None) -> Runs:
        """F(x_i, box_i) for each pair (``boxes``: ``E x 4``, or ``E x J x 4`` for the union of
        J windows); ``labels`` (per image, or None) set the margins."""
        ...

    def unmasked(self, batch: PreparedBatch, labels: torch.Tensor | None) -> Runs:
        """M(x) per image, once per prepared batch (shared by the certifiers sharing it)."""
        ...

    def undefended(self, batch: PreparedBatch) -> torch.Tensor:
        """The undefended model's prediction per image (g on the unmasked, unpruned inputs),
        once per prepared batch."""
        ...


@dataclass(frozen=True)
class Evaluation:
    """A method's results on N images (one chunk)."""

    base: torch.Tensor  # N, M(x)
    vanilla: torch.Tensor  # N, the undefended model's prediction (certify only; else M(x))
    mask_predictions: torch.Tensor  # N x n_masks
    n_evaluated: torch.Tensor  # N
    min_margin: torch.Tensor  # N
    output: torch.Tensor  # N: detect(x) / the recovered label, ALERT for an alert
    alert_box: torch.Tensor  # N x 4, NO_BOX rows without a located alert
    recovered: torch.Tensor  # N, the located alert's prediction, ALERT where none
    min_confidence: torch.Tensor  # N (NaN for recovery methods)
    max_alert_confidence: torch.Tensor  # N (NaN for recovery methods)
    certified: torch.Tensor  # N bool (False without labels)


class Method(Protocol):
    """One defense, built for a model and a :class:`CertConfig` by its module's ``build``."""

    config: CertConfig

    @property
    def predictor(self) -> MaskedPredictor:
        """F(x, m): what the pairs run."""
        ...

    @property
    def preparation_key(self) -> Hashable:
        """Methods of one model with equal keys share :meth:`MaskedPredictor.prepare` results
        and their memo (M(x), the undefended prediction): the key must name everything the
        prepared state and g depend on besides the model."""
        ...

    def evaluate(self, batch: PreparedBatch, labels: torch.Tensor | None, family: MaskFamily,
                 pairs: Pairs, full_map: bool) -> Evaluation:
        """Outputs of the method's rule on one chunk, and with ``labels`` its certificates.
        ``full_map``: run every window (pair) the predictor does not spare, for audits;
        otherwise the method's work avoidance, with the same outputs and certificates."""
        ...


def undefended_or_base(pruned: bool, batch: PreparedBatch, labels: torch.Tensor | None,
                       base: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """The undefended model's predictions (certify only): g on the unpruned inputs for a pruned
    method; otherwise M(x) is the undefended model already."""
    return pairs.undefended(batch) if labels is not None and pruned else base
