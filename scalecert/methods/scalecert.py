"""ScaleCert (Han et al., NeurIPS 2021): certified detection on the SIN-pruned model.

F(x, m) = g(A * 1[keep_m]): the model is split at a superficial layer, A = f(x) is the stem's
output, and keep_m is the image's top-k positions by superficial importance (SIN) outside the
footprint of window m. The stem runs once per image (:class:`SinPredictor`); a window whose
footprint misses the image's kept positions predicts M(x) with no run (the skip lemma). The
certificate is certified detection's (:mod:`scalecert.methods.detection`). Fine-tuning trains
the same forward pass, with the selection made on detached scores so that gradient reaches only
kept features (winner-take-all).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalecert.config import CertConfig
from scalecert.geometry import Footprints
from scalecert.methods.detection import DetectionRule
from scalecert.models.base import StagedClassifier
from scalecert.sin import (
    chosen_in_order,
    gather_pruned,
    keep_count,
    keep_positions,
    prune,
    selection_order,
    sin_scores,
)


def predictor(model: StagedClassifier, config: CertConfig) -> "SinPredictor":
    """F(x, m) for certification: the model split at ``config.layer``, top ``config.top_k``."""
    return SinPredictor(model, config.top_k, config.layer)


def build(model: StagedClassifier, config: CertConfig) -> DetectionRule:
    """Certified detection with the SIN predictor; prepared stems are shared by the settings of
    one layer and top-k (several patch sizes of a run)."""
    sin = predictor(model, config)
    return DetectionRule(sin, config, preparation_key=preparation_key(sin))


def preparation_key(sin: "SinPredictor") -> tuple:
    """Under which key prepared stems (and M(x)) are shared: one layer and top-k of a model."""
    return ("sin", sin.layer, sin.top_k)


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Logits of F(x, m) for training, one window per image (the empty box: none)."""
    split = model.split(config.layer)
    features = split.stem(images)
    feature_hw = tuple(features.shape[2:])
    excluded = Footprints(split.geometry, feature_hw)(windows).to(features.device)
    order = selection_order(sin_scores(features.detach()))
    keep = keep_positions(order, excluded, keep_count(config.top_k, feature_hw))
    return split.head(prune(features, keep))


@dataclass(frozen=True)
class StemFeatures:
    """Stem output of a batch and its SIN selection: everything F(x, m) needs."""

    features: torch.Tensor  # B x C x h x w, the stem output A
    order: torch.Tensor  # B x P, selection order of positions
    keep: torch.Tensor  # B x P, keep_empty
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, rows: slice) -> "StemFeatures":
        return StemFeatures(self.features[rows], self.order[rows], self.keep[rows],
                            memo=self.memo.setdefault(("rows", rows.start, rows.stop), {}))


class SinPredictor:
    """F(x, m) for the SIN-pruned model split at ``layer``.

    The stem always runs on batches of exactly ``stem_batch`` images (the last one padded with
    zeros) in channels_last: one input shape keeps its kernels and their summation order fixed,
    so an image's features outside a window's footprint are bit-for-bit the same whatever
    pixels sit inside the window and whatever images share its batch. The soundness argument
    needs equality, not closeness: a near-tie in the top-k could otherwise flip.
    """

    def __init__(
        self, model: StagedClassifier, top_k: float, layer: str | None = None, stem_batch: int = 16
    ) -> None:
        split = model.split(layer)
        self.layer = split.layer
        self.stem = split.stem
        self.head = split.head
        self.geometry = split.geometry
        self.top_k = top_k
        self.stem_batch = stem_batch
        self._footprints: dict[tuple[int, int], Footprints] = {}  # per feature-map size

    def stem_features(self, images: torch.Tensor) -> torch.Tensor:
        """A = f(x) for ``B x 3 x H x W`` images, in fixed-shape batches (see the class doc)."""
        parts = []
        for start in range(0, len(images), self.stem_batch):
            chunk = images[start:start + self.stem_batch]
            padded = chunk.new_zeros((self.stem_batch, *chunk.shape[1:]))
            padded[:len(chunk)] = chunk
            features = self.stem(padded.contiguous(memory_format=torch.channels_last))
            parts.append(features[:len(chunk)])
        return torch.cat(parts)

    def prepare(self, images: torch.Tensor) -> StemFeatures:
        features = self.stem_features(images)
        order = selection_order(sin_scores(features))
        k = keep_count(self.top_k, features.shape[2:])
        keep = keep_positions(order, torch.zeros_like(order, dtype=torch.bool), k)
        return StemFeatures(features=features, order=order, keep=keep)

    def footprints(self, feature_hw: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
        """``n x P`` boolean footprints (on the CPU) of pixel boxes on a ``feature_hw`` map."""
        return self._footprints_on(feature_hw)(boxes)

    def _footprints_on(self, feature_hw: tuple[int, int]) -> Footprints:
        key = (int(feature_hw[0]), int(feature_hw[1]))
        if key not in self._footprints:
            self._footprints[key] = Footprints(self.geometry, key)
        return self._footprints[key]

    def evaluation_priority(self, batch: StemFeatures, boxes: torch.Tensor) -> torch.Tensor:
        """How many kept (SIN) positions each window's footprint removes: zero means the skip
        lemma applies; more removed positions are more likely to change the prediction."""
        feet = self.footprints(batch.features.shape[2:], boxes).to(batch.keep.device)
        return (batch.keep.to(torch.float32) @ feet.to(torch.float32).T).cpu()

    @property
    def g(self) -> torch.nn.Module:
        return self.head

    def g_inputs(
        self, batch: StemFeatures, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """A * 1[keep_m] per pair: the SIN selection without the window's footprint (without
        the union of the windows' footprints for ``E x J x 4`` boxes).

        keep_m is the first k positions of the image's selection order outside foot(m), so it
        lies within the first k + |foot(m)| of them: only that prefix of the order (for the
        largest footprint among the pairs) is gathered and tested against the footprints, as
        row and column hits (:meth:`Footprints.axis_hits`), instead of all P positions. The
        keep sets are those of :func:`keep_positions` on the whole order, bit for bit (see
        :func:`~scalecert.sin.keep_in_order`); the work per pair shrinks from P to about
        k + |foot(m)| positions, a quarter of P on CIFAR (k = 154 and footprints up to 121 of
        1024). The pruned features are then written straight from the kept positions
        (:func:`~scalecert.sin.gather_pruned`), not gathered whole and masked."""
        feature_hw = batch.features.shape[2:]
        positions = batch.order.shape[1]
        k = keep_count(self.top_k, feature_hw)
        boxes = torch.as_tensor(boxes, dtype=torch.int64)
        per_input = 1 if boxes.dim() == 2 else boxes.shape[1]  # windows masked together
        rows, cols = self._footprints_on(feature_hw).axis_hits(boxes.reshape(-1, 4))
        # the union of an input's footprints is at most the sum of their sizes
        sizes = (rows.sum(dim=1) * cols.sum(dim=1)).view(-1, per_input).sum(dim=1)
        largest = int(sizes.max()) if len(sizes) else 0
        prefix = batch.order[image_index, :min(positions, k + largest)]
        rows, cols = rows.to(prefix.device), cols.to(prefix.device)
        width = feature_hw[1]
        prefix_rows, prefix_cols = prefix // width, prefix % width
        excluded = torch.zeros_like(prefix, dtype=torch.bool)
        for j in range(per_input):
            excluded |= (rows[j::per_input].gather(1, prefix_rows)
                         & cols[j::per_input].gather(1, prefix_cols))
        pair, column = chosen_in_order(excluded, k).nonzero(as_tuple=True)
        pruned = gather_pruned(batch.features, image_index, pair, prefix[pair, column])
        return pruned.contiguous(memory_format=torch.channels_last)

    def unmasked_inputs(self, batch: StemFeatures) -> torch.Tensor:
        """The stem features unpruned: ``head`` of them is the whole model's output."""
        return batch.features.contiguous(memory_format=torch.channels_last)
