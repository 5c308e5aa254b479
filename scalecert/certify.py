"""Stage 3, detection and certification (the paper's Algorithms 1 and 2), batched.

certified(x, y) iff M(x) = y and F(x, m) = y for every window m of the family, each computed
prediction beating its runner-up logit by at least ``margin``. Then, for any x' equal to x
outside one p x p square, ``detect(x')`` is y or ALERT: the r x r block of windows containing
the square sees exactly the features it saw on x, so it predicts y, and either M(x') = y or
that block outvotes it. The pairs (image, window) of many images share g's batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.masks import MaskFamily
from scalecert.methods import load_method, method_info
from scalecert.models.base import StagedClassifier
from scalecert.occlusion import EMPTY_BOX, MaskedPredictor, PreparedBatch, SinPredictor
from scalecert.precision import FastPath, GRunner, top_confidence
from scalecert.precision import (
    margins as logit_margins,  # not `margins`: a local name below
)

ALERT = -1
NOT_EVALUATED = -2  # mask_predictions entry of a window left unrun (full_map=False, r = 1)
NO_MAJORITY = -3  # block_votes entry of a block without a strict majority
NO_BOX = (-1, -1, -1, -1)


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


def locate_block(base: int, grid: torch.Tensor, r: int) -> tuple[int, int] | None:
    """Top-left grid index of the first r x r block (row-major) whose masks all predict the
    same class other than ``base``, or None. Unevaluated masks belong to no block."""
    rows, cols = grid.shape
    for i in range(rows - r + 1):
        for j in range(cols - r + 1):
            block = grid[i:i + r, j:j + r]
            first = int(block[0, 0])
            if first not in (base, NOT_EVALUATED) and bool((block == first).all()):
                return i, j
    return None


def block_votes(grid: torch.Tensor, r: int, num_classes: int) -> torch.Tensor:
    """The strict majority label of every r x r block of an ``N x K1 x K2`` grid of window
    predictions (``NO_MAJORITY`` where none): ``N x (K1 - r + 1) x (K2 - r + 1)``."""
    blocks = grid.unfold(1, r, 1).unfold(2, r, 1)
    flat = blocks.reshape(*blocks.shape[:3], r * r)
    counts = torch.nn.functional.one_hot(flat.clamp(min=0), num_classes).sum(dim=3)
    top, label = counts.max(dim=-1)
    return torch.where(2 * top > r * r, label, NO_MAJORITY)


def robust_block_majorities(robust: torch.Tensor, r: int) -> torch.Tensor:
    """Per image: whether every r x r block of an ``N x K1 x K2`` boolean grid (windows that
    predict the label with the margin) is True in a strict majority of its windows."""
    counts = robust.to(torch.int64).unfold(1, r, 1).unfold(2, r, 1).sum(dim=(3, 4))
    return (2 * counts > r * r).flatten(1).all(dim=1)


def evaluation_order(priority: torch.Tensor) -> torch.Tensor:
    """Window indices by priority, highest first, ties in family order: of a 1-D ``priority``,
    or of each row of an ``N x n_masks`` one (a stable sort, so each row's order is the one it
    would get alone)."""
    return torch.sort(-priority, dim=-1, stable=True).indices


def detect_outcome(
    base: int, mask_predictions: torch.Tensor, family: MaskFamily,
    priority: torch.Tensor | None = None, order: torch.Tensor | None = None,
) -> tuple[int, tuple[int, int] | None]:
    """Algorithm 1 on one image's predictions: (output, located block or None).

    With r = 1 and the windows' ``priority`` given, the located window is the first
    disagreeing one in :func:`evaluation_order`, which work avoidance always runs, so the full
    map and work avoidance report the same window; otherwise the first block in row-major
    order. NOT_EVALUATED entries only occur with r = 1 after a disagreement was found (work
    avoidance), which the block rule then reports, so they never decide an outcome.
    ``order``: ``evaluation_order(priority)`` when the caller already has it (the certifier
    sorts each chunk's priorities once for scheduling and detection), else it is computed."""
    if bool(((mask_predictions == base) | (mask_predictions == NOT_EVALUATED)).all()):
        return base, None
    if family.r == 1 and priority is not None:
        if order is None:
            order = evaluation_order(priority)
        ordered = mask_predictions[order]
        first = int(((ordered != base) & (ordered != NOT_EVALUATED)).nonzero()[0, 0])
        return ALERT, divmod(int(order[first]), family.grid_shape[1])
    block = locate_block(base, mask_predictions.view(family.grid_shape), family.r)
    if block is not None:
        return ALERT, block
    disagreeing = int((mask_predictions != base).sum())
    if 2 * disagreeing > mask_predictions.numel():
        return ALERT, None
    return base, None


@dataclass(frozen=True)
class _PairRuns:
    """What was run for one chunk: M(x) per image, then the evaluated (image, window) pairs."""

    base: torch.Tensor  # N predictions M(x)
    base_margin: torch.Tensor  # N
    base_confidence: torch.Tensor  # N
    image_of: torch.Tensor  # E image index of each evaluated pair
    mask_of: torch.Tensor  # E window index
    predictions: torch.Tensor  # E
    margins: torch.Tensor  # E
    confidences: torch.Tensor  # E, softmax probability of each prediction


@dataclass(frozen=True)
class _Evaluation:
    base: torch.Tensor  # N, M(x)
    vanilla: torch.Tensor  # N, the undefended model's prediction (certify only; else M(x))
    mask_predictions: torch.Tensor  # N x n_masks
    n_evaluated: torch.Tensor  # N
    min_margin: torch.Tensor  # N
    output: torch.Tensor
    alert_box: torch.Tensor
    recovered: torch.Tensor
    min_confidence: torch.Tensor
    max_alert_confidence: torch.Tensor
    certified: torch.Tensor  # N bool (certify only; False without labels)


@dataclass(frozen=True)
class _Runs:
    """Predictions of g on some pairs, their margins and their softmax confidences."""

    predictions: torch.Tensor
    margins: torch.Tensor
    confidences: torch.Tensor


def default_batch_size(device: str | torch.device) -> int:
    """(image, window) pairs per run of g when none is asked for: 256 on CUDA, 64 on a CPU,
    where g's activations then stay in cache (ResNet-20's g alone ran about 1.5x faster at 64
    than at 256 on 2 cores)."""
    return 256 if torch.device(device).type == "cuda" else 64


class Certifier:
    """Certifies and detects with one model and one :class:`CertConfig`.

    ``batch_size`` is the number of (image, window) pairs per run of g (None: the device's
    :func:`default_batch_size`); ``image_chunk`` bounds
    how many images' stem features are held at once. ``full_map=False`` turns on work
    avoidance for r = 1: an image's windows run most likely first (the predictor's
    ``evaluation_priority``) and stop at the first one that disagrees with M(x), which leaves
    ``certified``, ``clean_output``, ``alert_box`` and ``recovered_prediction`` unchanged (with
    r = 1 the located window is the first disagreeing one in that order, which both modes run);
    unrun windows read NOT_EVALUATED in ``mask_predictions``, and ``min_margin`` of a
    non-certified image covers the windows run. ``full_map=True`` (default) runs every window
    the skip lemma does not spare, for audits. Both methods, ``scalecert`` and ``masking``, take
    the same path. The model itself is moved to ``device``, converted to channels_last and put
    in eval mode.

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
        self.method = load_method(config.method)
        self.predictor: MaskedPredictor = self.method.predictor(self.model, config)
        # a recovery method's own rule replaces detection (Algorithm 1) and its certificate
        self.recovery = method_info(config.method).guarantee == "recovery"
        self.fast = fast
        # the alert-confidence rule decides on TAU (alerts) and TAU + margin / 2 (certificates)
        levels = (() if config.alert_confidence is None
                  else (config.alert_confidence, config.certificate_confidence))
        self.runner = GRunner(self.predictor.g, fast, config.margin, self.device, batch_size,
                              confidence_levels=levels)

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
    def preparation_key(self) -> tuple:
        """Certifiers with equal keys (same model object) can share :meth:`prepare` results,
        e.g. several patch sizes of one run: the stem runs once per image."""
        if isinstance(self.predictor, SinPredictor):
            return ("sin", id(self.model), self.predictor.layer, self.config.top_k)
        return ("pixels", id(self.model))

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> PreparedBatch:
        """Per-image work shared by every window (the stem and SIN selection for scalecert)."""
        self._check_images(images)
        return self._prepare(images)

    def _prepare(self, images: torch.Tensor) -> PreparedBatch:
        """:meth:`prepare` of images already checked (:meth:`_check_images`)."""
        return self.predictor.prepare(images.to(self.device))

    @torch.no_grad()
    def certify(
        self, images: torch.Tensor, labels: torch.Tensor, prepared: PreparedBatch | None = None
    ) -> CertifyResult:
        """Certificates for labelled images (``N x 3 x H x W`` floats in [0, 1], ``N`` ints).

        ``prepared``: the result of :meth:`prepare` on the same images, from this certifier or
        one with the same :attr:`preparation_key`, to skip that work.
        """
        self._check_images(images)
        return self._certify(images, self._check_labels(labels, len(images)), prepared)

    def _certify(
        self, images: torch.Tensor, labels: torch.Tensor, prepared: PreparedBatch | None
    ) -> CertifyResult:
        """:meth:`certify` of images and labels already checked (:meth:`_check_images`,
        :meth:`_check_labels`). The image check reads every pixel (its value range), so a
        caller that certifies the same images under several settings
        (:class:`CertifierGroup`) checks them once and calls this for each setting."""
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
        """Algorithm 1 on possibly patched images: the label, or -1 (ALERT) with a location."""
        self._check_images(images)
        evaluation = self._evaluate(images, None, prepared)
        return DetectResult(
            output=evaluation.output,
            prediction=evaluation.base,
            alert_box=evaluation.alert_box,
            recovered_prediction=evaluation.recovered,
            mask_predictions=evaluation.mask_predictions,
            n_evaluated=evaluation.n_evaluated,
        )

    # -- internals ------------------------------------------------------------------------

    def _evaluate(
        self, images: torch.Tensor, labels: torch.Tensor | None, prepared: PreparedBatch | None
    ) -> _Evaluation:
        if prepared is not None and len(prepared) != len(images):
            raise InvalidOption(f"prepared: holds {len(prepared)} images, not {len(images)}")
        family = self.mask_family(images.shape[2], images.shape[3])
        parts = []
        for start in range(0, len(images), self.image_chunk):
            rows = slice(start, start + self.image_chunk)
            batch = (self.predictor.prepare(images[rows].to(self.device)) if prepared is None
                     else prepared.select(rows))
            parts.append(self._evaluate_chunk(
                batch, None if labels is None else labels[rows], family))
        return _Evaluation(*(
            torch.cat([getattr(part, field.name) for part in parts])
            for field in fields(_Evaluation)
        ))

    def _evaluate_chunk(
        self, batch: PreparedBatch, labels: torch.Tensor | None, family: MaskFamily
    ) -> _Evaluation:
        if self.recovery:
            return self._recover_chunk(batch, labels, family)
        boxes = family.boxes()
        n_images, n_masks = len(batch), family.n_masks
        priority = self.predictor.evaluation_priority(batch, boxes)
        # each image's window order, sorted once here for the schedule and detection alike
        order = evaluation_order(priority) if family.r == 1 else None
        if self.full_map or family.r > 1:
            runs = self._run_all(batch, labels, boxes, priority)
        else:
            runs = self._run_until_settled(batch, labels, boxes, priority, order)
        base, image_of, mask_of = runs.base, runs.image_of, runs.mask_of

        # skipped windows (skip lemma) give M(x); needed but unevaluated ones: NOT_EVALUATED
        mask_predictions = base[:, None].repeat(1, n_masks)
        mask_predictions[priority > 0] = NOT_EVALUATED
        mask_predictions[image_of, mask_of] = runs.predictions
        min_margin = runs.base_margin.clone()
        min_margin.scatter_reduce_(0, image_of, runs.margins, reduce="amin")
        n_evaluated = torch.bincount(image_of, minlength=n_images)
        # confidences of the windows (not of M(x) itself): skipped windows have M(x)'s,
        # unevaluated ones count in neither extreme (1 is neutral for the minimum)
        skipped = (priority == 0).any(dim=1)
        min_confidence = torch.where(skipped, runs.base_confidence, torch.ones(n_images))
        min_confidence.scatter_reduce_(0, image_of, runs.confidences, reduce="amin")
        disagreeing = runs.predictions != base[image_of]
        max_alert_confidence = torch.zeros(n_images)
        max_alert_confidence.scatter_reduce_(
            0, image_of[disagreeing], runs.confidences[disagreeing], reduce="amax")
        # the alert-confidence rule: a window disagreeing below TAU counts as agreeing
        voting = mask_predictions
        tau = self.config.alert_confidence
        if tau is not None:
            voting = mask_predictions.clone()
            quiet = disagreeing & (runs.confidences < tau)
            voting[image_of[quiet], mask_of[quiet]] = base[image_of[quiet]]

        if self.config.vote == "majority":
            output, alert_box, certified = self._block_vote(runs, mask_predictions, labels,
                                                            family)
            index = (alert_box[:, 0] >= 0).nonzero()[:, 0]
            recovered = torch.full((n_images,), ALERT, dtype=torch.int64)
            if len(index):
                recovered[index] = self._run_pairs(batch, index, alert_box[index], None).predictions
        else:
            output, alert_box, recovered = self._detect_outcomes(
                batch, base, voting, mask_predictions, priority, order, family)
            certified = min_margin >= self.config.margin
            if tau is not None:
                certified &= min_confidence >= self.config.certificate_confidence
        if labels is None:
            certified = torch.zeros(n_images, dtype=torch.bool)
        # the undefended model (certify only): g on the unpruned stem features for a pruned
        # method (scalecert); otherwise M(x) is the undefended model already
        undefended = labels is not None and method_info(self.config.method).pruned
        vanilla = self._vanilla(batch) if undefended else base
        return _Evaluation(base, vanilla, mask_predictions, n_evaluated, min_margin, output,
                           alert_box, recovered, min_confidence, max_alert_confidence, certified)

    def _detect_outcomes(
        self, batch: PreparedBatch, base: torch.Tensor, voting: torch.Tensor,
        mask_predictions: torch.Tensor, priority: torch.Tensor, order: torch.Tensor | None,
        family: MaskFamily,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1 on every image (``voting``: the window predictions that count): output,
        alert box and recovered prediction."""
        n_images = len(base)
        output = base.clone()
        alert_box = torch.tensor([NO_BOX]).repeat(n_images, 1)
        recovered = torch.full((n_images,), ALERT, dtype=torch.int64)
        # image by image only where some window disagrees with M(x): the others (most
        # images) output M(x) with no box, which one vectorised test settles
        agrees = ((voting == base[:, None]) | (voting == NOT_EVALUATED)).all(dim=1)
        located, boxes_of_located, windows_of_located = [], [], []
        for i in (~agrees).nonzero()[:, 0].tolist():
            output[i], block = detect_outcome(int(base[i]), voting[i], family,
                                              priority[i], None if order is None else order[i])
            if block is not None:
                located.append(i)
                boxes_of_located.append(family.block_box(*block))
                windows_of_located.append(block[0] * family.grid_shape[1] + block[1])
        if located:
            index = torch.tensor(located)
            alert_box[index] = torch.tensor(boxes_of_located, dtype=torch.int64)
            if family.r == 1:  # the block is one window, whose prediction is already known
                recovered[index] = mask_predictions[index, torch.tensor(windows_of_located)]
            else:
                recovered[index] = self._run_pairs(batch, index, alert_box[index], None).predictions
        return output, alert_box, recovered

    def _block_vote(
        self, runs: _PairRuns, mask_predictions: torch.Tensor, labels: torch.Tensor | None,
        family: MaskFamily,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block-vote rule (``vote="majority"``, r >= 2, every window run): ALERT unless
        every r x r block's strict majority is M(z), located at the first block (row-major)
        that differs; certified when M(x) = y with the margin and in every block a strict
        majority of windows predicts y with the margin."""
        base, r = runs.base, family.r
        n_images = len(base)
        grid = mask_predictions.view(n_images, *family.grid_shape)
        votes = block_votes(grid, r, self.model.num_classes)
        differs = (votes != base[:, None, None]).flatten(1)
        output = torch.where(differs.any(dim=1), ALERT, base)
        alert_box = torch.tensor([NO_BOX]).repeat(n_images, 1)
        columns = votes.shape[2]
        for i in differs.any(dim=1).nonzero()[:, 0].tolist():
            first = int(differs[i].nonzero()[0, 0])  # row-major
            alert_box[i] = torch.tensor(family.block_box(*divmod(first, columns)))
        certified = torch.zeros(n_images, dtype=torch.bool)
        if labels is not None:
            margins = runs.base_margin[:, None].repeat(1, family.n_masks)
            margins[runs.image_of, runs.mask_of] = runs.margins
            robust = (mask_predictions == labels[:, None]) & (margins >= self.config.margin)
            certified = ((runs.base_margin >= self.config.margin)
                         & robust_block_majorities(robust.view_as(grid), r))
        return output, alert_box, certified

    def _recover_chunk(
        self, batch: PreparedBatch, labels: torch.Tensor | None, family: MaskFamily
    ) -> _Evaluation:
        """A recovery method's rule (``recover`` of its module) on one chunk: it asks for
        one-mask and two-mask predictions, which run here in shared batches of g."""
        boxes = family.boxes()
        priority = self.predictor.evaluation_priority(batch, boxes)
        unmasked = self._unmasked_runs(batch, labels)
        base, base_margin = unmasked.predictions, unmasked.margins

        def run(image_index: torch.Tensor, first: torch.Tensor,
                second: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            windows = boxes[first] if second is None else torch.stack(
                (boxes[first], boxes[second]), dim=1)
            runs = self._run_pairs(batch, image_index, windows, labels)
            return runs.predictions, runs.margins

        outcome = self.method.recover(run, base, base_margin, priority > 0, labels,
                                      self.config.margin, self.batch_size, full=self.full_map)
        n_images = len(batch)
        vanilla = (self._vanilla(batch) if labels is not None and method_info(
            self.config.method).pruned else base)
        no_confidence = torch.full((n_images,), float("nan"))  # a detection rule's figure
        certified = (outcome.min_margin >= self.config.margin if labels is not None
                     else torch.zeros(n_images, dtype=torch.bool))
        return _Evaluation(
            base, vanilla, outcome.one_mask, outcome.n_evaluated, outcome.min_margin,
            outcome.output, torch.tensor([NO_BOX]).repeat(n_images, 1),
            torch.full((n_images,), ALERT, dtype=torch.int64), no_confidence, no_confidence,
            certified)

    def _run_all(
        self, batch: PreparedBatch, labels: torch.Tensor | None, boxes: torch.Tensor,
        priority: torch.Tensor,
    ) -> _PairRuns:
        """M(x) and every window the skip lemma does not spare."""
        unmasked = self._unmasked_runs(batch, labels)
        image_of, mask_of = (priority > 0).nonzero(as_tuple=True)
        runs = self._run_pairs(batch, image_of, boxes[mask_of], labels)
        return _PairRuns(unmasked.predictions, unmasked.margins, unmasked.confidences,
                         image_of, mask_of, runs.predictions, runs.margins, runs.confidences)

    def _memo_key(self, kind: str, labels: torch.Tensor | None) -> tuple:
        """What a memoised result of the prepared batch depends on besides its images."""
        return (kind, self.fast, self.config.margin, self.runner.confidence_levels,
                None if labels is None else labels.numpy().tobytes())

    def _unmasked_runs(self, batch: PreparedBatch, labels: torch.Tensor | None) -> _Runs:
        """M(x), its margins and confidences: computed once per prepared batch, shared by the
        certifiers that share it (patch sizes do not change M(x))."""
        key = self._memo_key("M(x)", labels)
        if key not in batch.memo:
            n_images = len(batch)
            batch.memo[key] = self._run_pairs(
                batch, torch.arange(n_images), torch.tensor([EMPTY_BOX]).expand(n_images, 4),
                labels)
        return batch.memo[key]

    def _run_until_settled(
        self, batch: PreparedBatch, labels: torch.Tensor | None, boxes: torch.Tensor,
        priority: torch.Tensor, order: torch.Tensor,
    ) -> _PairRuns:
        """r = 1 work avoidance: an image's windows run in order of priority until one
        disagrees with M(x). That settles both outcomes (not certified; detection alerts), so
        its remaining windows are left unevaluated. Images share g's batches round by round.
        ``order`` is :func:`evaluation_order` of ``priority`` (sorted once per chunk)."""
        n_images = len(batch)
        unmasked = self._unmasked_runs(batch, labels)
        base = unmasked.predictions
        # a window disagreeing with M(x) below the alert confidence settles nothing: detection
        # goes on to the next window (and the certificate has failed already)
        tau = 0.0 if self.config.alert_confidence is None else self.config.alert_confidence
        # per image: needed windows, highest priority first (ties: family order); plain
        # Python lists, read once, rather than one tensor lookup per window
        needed = torch.gather(priority > 0, 1, order).tolist()
        queues = [[m for m, need in zip(row, row_needed) if need]
                  for row, row_needed in zip(order.tolist(), needed)]
        done = [0] * n_images
        settled = [False] * n_images
        image_of, mask_of, predictions, margins, confidences = [], [], [], [], []
        while True:
            active = [i for i in range(n_images) if not settled[i] and done[i] < len(queues[i])]
            if not active:
                break
            per_image = max(1, self.batch_size // len(active))  # about batch_size pairs a round
            round_images, round_masks = [], []
            for i in active:
                taken = queues[i][done[i]:done[i] + per_image]
                done[i] += len(taken)
                round_images += [i] * len(taken)
                round_masks += taken
            index, masks = torch.tensor(round_images), torch.tensor(round_masks)
            runs = self._run_pairs(batch, index, boxes[masks], labels)
            alerting = (runs.predictions != base[index]) & (runs.confidences >= tau)
            for i in set(index[alerting].tolist()):
                settled[i] = True
            image_of.append(index)
            mask_of.append(masks)
            predictions.append(runs.predictions)
            margins.append(runs.margins)
            confidences.append(runs.confidences)
        if not image_of:
            empty = torch.zeros(0, dtype=torch.int64)
            return _PairRuns(base, unmasked.margins, unmasked.confidences, empty, empty, empty,
                             torch.zeros(0), torch.zeros(0))
        return _PairRuns(base, unmasked.margins, unmasked.confidences, torch.cat(image_of),
                         torch.cat(mask_of), torch.cat(predictions), torch.cat(margins),
                         torch.cat(confidences))

    def _run_pairs(
        self,
        batch: PreparedBatch,
        image_index: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> _Runs:
        """Predictions, margins and confidences of F(x_i, box_i), ``batch_size`` pairs per run
        of g."""
        predictions, pair_margins, confidences = [], [], []
        for start in range(0, len(image_index), self.batch_size):
            index = image_index[start:start + self.batch_size]
            pair_labels = None if labels is None else labels[index]
            inputs = self.predictor.g_inputs(
                batch, index.to(self.device), boxes[start:start + self.batch_size])
            logits = self.runner(inputs, pair_labels).cpu()
            predictions.append(logits.argmax(dim=1))
            pair_margins.append(logit_margins(logits, pair_labels))
            confidences.append(top_confidence(logits))
        if not predictions:
            return _Runs(torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0))
        return _Runs(torch.cat(predictions), torch.cat(pair_margins), torch.cat(confidences))

    def _vanilla(self, batch: PreparedBatch) -> torch.Tensor:
        """The undefended model's predictions: g on the unmasked, unpruned inputs (once per
        prepared batch, like M(x))."""
        key = self._memo_key("vanilla", None)
        if key not in batch.memo:
            inputs = self.predictor.unmasked_inputs(batch)
            batch.memo[key] = torch.cat([
                self.runner(inputs[start:start + self.batch_size]).argmax(dim=1).cpu()
                for start in range(0, len(inputs), self.batch_size)
            ])
        return batch.memo[key]

    def _check_images(self, images: torch.Tensor) -> None:
        """Refuse anything but a non-empty ``N x 3 x H x W`` float batch in [0, 1] whose sides
        hold this certifier's patch."""
        _check_pixels(images)
        self._check_patch_fits(images)

    def _check_patch_fits(self, images: torch.Tensor) -> None:
        """The part of :meth:`_check_images` that depends on the setting (the patch size);
        cheap: it reads the shape only."""
        height, width = images.shape[2:]
        if self.config.patch_px > min(height, width):
            raise InvalidOption(
                f"patch_px: a {self.config.patch_px} px patch is larger than the images "
                f"({height}x{width})"
            )

    def _check_labels(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or len(labels) != count:
            raise InvalidOption(f"labels: expected {count} labels, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise InvalidOption(f"labels: expected integers, got dtype {labels.dtype}")
        labels = labels.to(torch.int64).cpu()
        num_classes = self.model.num_classes
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise InvalidOption(f"labels: values must lie in [0, {num_classes}), got {labels.tolist()[:10]}")
        return labels


def _check_pixels(images: Any) -> None:
    """Refuse anything but a non-empty ``N x 3 x H x W`` float batch with values in [0, 1]
    (:class:`InvalidOption` naming ``images``). Reads every pixel once (one pass for both
    ends of the range), so callers check a batch once, not once per setting."""
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

        The images and labels are checked once for all the settings (each setting only checks
        that its patch fits), before any work: the pixel check reads every pixel."""
        _check_pixels(images)
        for certifier in self.certifiers:
            certifier._check_patch_fits(images)
        labels = self.certifiers[0]._check_labels(labels, len(images))  # one model: one check
        prepared: dict[tuple, PreparedBatch] = {}
        outcomes = []
        for certifier in self.certifiers:
            began = time.perf_counter()
            key = certifier.preparation_key
            if key not in prepared:
                prepared[key] = certifier._prepare(images)
            result = certifier._certify(images, labels, prepared[key])
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
