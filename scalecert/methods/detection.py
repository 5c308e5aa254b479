"""Certified detection (the paper's Algorithms 1 and 2), the rule ScaleCert and masking share.

certified(x, y) iff M(x) = y and F(x, m) = y for every window m of the family, each computed
prediction beating its runner-up logit by at least ``margin``. Then, for any x' equal to x
outside one p x p square, ``detect(x')`` is y or ALERT: the r x r block of windows containing
the square sees exactly the features it saw on x, so it predicts y, and either M(x') = y or
that block outvotes it. Variants: the alert confidence TAU (a window disagreeing below TAU does
not alert; a certificate needs every window at TAU + margin / 2) and the block vote
(``vote="majority"``, Minority Reports' own). :class:`DetectionRule` runs it on one chunk with
any predictor, through the certifier's :class:`~scalecert.methods.base.Pairs`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from scalecert.config import CertConfig
from scalecert.masks import MaskFamily
from scalecert.methods.base import (
    ALERT,
    NO_BOX,
    NO_MAJORITY,
    NOT_EVALUATED,
    Evaluation,
    MaskedPredictor,
    Pairs,
    PreparedBatch,
    undefended_or_base,
)
from scalecert.methods.registry import method_info


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
    ``order``: ``evaluation_order(priority)`` when the caller already has it (the rule sorts
    each chunk's priorities once for scheduling and detection), else it is computed."""
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
class _WindowRuns:
    """What was run for one chunk: M(x) per image, then the evaluated (image, window) pairs."""

    base: torch.Tensor  # N predictions M(x)
    base_margin: torch.Tensor  # N
    base_confidence: torch.Tensor  # N
    image_of: torch.Tensor  # E image index of each evaluated pair
    mask_of: torch.Tensor  # E window index
    predictions: torch.Tensor  # E
    margins: torch.Tensor  # E
    confidences: torch.Tensor  # E, softmax probability of each prediction


class DetectionRule:
    """Certified detection with one predictor: what a detection method's ``evaluate`` runs.

    Whether M is the SIN-pruned model (then the undefended model is computed apart) is the
    registry's ``pruned``. Work avoidance (``full_map=False``, r = 1): an image's windows run
    most likely first (the predictor's ``evaluation_priority``) and stop at the first one that
    disagrees with M(x), which leaves the certificate, the output, the alert box and the
    recovered prediction unchanged (the located window is the first disagreeing one in that
    order, which both modes run); unrun windows read NOT_EVALUATED and ``min_margin`` of a
    non-certified image covers
    the windows run.
    """

    def __init__(self, predictor: MaskedPredictor, config: CertConfig,
                 preparation_key: Hashable) -> None:
        self.predictor = predictor
        self.config = config
        self.pruned = method_info(config.method).pruned  # M is the SIN-pruned model
        self.preparation_key = preparation_key

    def evaluate(self, batch: PreparedBatch, labels: torch.Tensor | None, family: MaskFamily,
                 pairs: Pairs, full_map: bool) -> Evaluation:
        config = self.config
        boxes = family.boxes()
        n_images, n_masks = len(batch), family.n_masks
        priority = self.predictor.evaluation_priority(batch, boxes)
        # each image's window order, sorted once here for the schedule and detection alike
        order = evaluation_order(priority) if family.r == 1 else None
        if full_map or family.r > 1:
            runs = self._run_all(batch, labels, boxes, priority, pairs)
        else:
            runs = self._run_until_settled(batch, labels, boxes, priority, order, pairs)
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
        tau = config.alert_confidence
        if tau is not None:
            voting = mask_predictions.clone()
            quiet = disagreeing & (runs.confidences < tau)
            voting[image_of[quiet], mask_of[quiet]] = base[image_of[quiet]]

        if config.vote == "majority":
            output, alert_box, certified = self._block_vote(
                runs, mask_predictions, labels, family, pairs.num_classes)
            index = (alert_box[:, 0] >= 0).nonzero()[:, 0]
            recovered = torch.full((n_images,), ALERT, dtype=torch.int64)
            if len(index):
                recovered[index] = pairs.run(batch, index, alert_box[index], None).predictions
        else:
            output, alert_box, recovered = self._detect_outcomes(
                batch, base, voting, mask_predictions, priority, order, family, pairs)
            certified = min_margin >= config.margin
            if tau is not None:
                certified &= min_confidence >= config.certificate_confidence
        if labels is None:
            certified = torch.zeros(n_images, dtype=torch.bool)
        vanilla = undefended_or_base(self.pruned, batch, labels, base, pairs)
        return Evaluation(base, vanilla, mask_predictions, n_evaluated, min_margin, output,
                          alert_box, recovered, min_confidence, max_alert_confidence, certified)

    def _detect_outcomes(
        self, batch: PreparedBatch, base: torch.Tensor, voting: torch.Tensor,
        mask_predictions: torch.Tensor, priority: torch.Tensor, order: torch.Tensor | None,
        family: MaskFamily, pairs: Pairs,
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
                recovered[index] = pairs.run(batch, index, alert_box[index], None).predictions
        return output, alert_box, recovered

    def _block_vote(
        self, runs: _WindowRuns, mask_predictions: torch.Tensor, labels: torch.Tensor | None,
        family: MaskFamily, num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block-vote rule (``vote="majority"``, r >= 2, every window run): ALERT unless
        every r x r block's strict majority is M(z), located at the first block (row-major)
        that differs; certified when M(x) = y with the margin and in every block a strict
        majority of windows predicts y with the margin."""
        base, r = runs.base, family.r
        n_images = len(base)
        grid = mask_predictions.view(n_images, *family.grid_shape)
        votes = block_votes(grid, r, num_classes)
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

    def _run_all(
        self, batch: PreparedBatch, labels: torch.Tensor | None, boxes: torch.Tensor,
        priority: torch.Tensor, pairs: Pairs,
    ) -> _WindowRuns:
        """M(x) and every window the skip lemma does not spare."""
        unmasked = pairs.unmasked(batch, labels)
        image_of, mask_of = (priority > 0).nonzero(as_tuple=True)
        runs = pairs.run(batch, image_of, boxes[mask_of], labels)
        return _WindowRuns(unmasked.predictions, unmasked.margins, unmasked.confidences,
                           image_of, mask_of, runs.predictions, runs.margins, runs.confidences)

    def _run_until_settled(
        self, batch: PreparedBatch, labels: torch.Tensor | None, boxes: torch.Tensor,
        priority: torch.Tensor, order: torch.Tensor, pairs: Pairs,
    ) -> _WindowRuns:
        """r = 1 work avoidance: an image's windows run in order of priority until one
        disagrees with M(x). That settles both outcomes (not certified; detection alerts), so
        its remaining windows are left unevaluated. Images share g's batches round by round.
        ``order`` is :func:`evaluation_order` of ``priority`` (sorted once per chunk)."""
        n_images = len(batch)
        unmasked = pairs.unmasked(batch, labels)
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
            per_image = max(1, pairs.batch_size // len(active))  # about batch_size pairs a round
            round_images, round_masks = [], []
            for i in active:
                taken = queues[i][done[i]:done[i] + per_image]
                done[i] += len(taken)
                round_images += [i] * len(taken)
                round_masks += taken
            index, masks = torch.tensor(round_images), torch.tensor(round_masks)
            runs = pairs.run(batch, index, boxes[masks], labels)
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
            return _WindowRuns(base, unmasked.margins, unmasked.confidences, empty, empty, empty,
                               torch.zeros(0), torch.zeros(0))
        return _WindowRuns(base, unmasked.margins, unmasked.confidences, torch.cat(image_of),
                           torch.cat(mask_of), torch.cat(predictions), torch.cat(margins),
                           torch.cat(confidences))
