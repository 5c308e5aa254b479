"""PatchCleanser (Xiang et al., USENIX Security 2022): double masking, certified recovery.

F(x, m) is the unpruned model on the image with window m's pixels occluded, F(x, {a, b}) with
both windows' pixels occluded. The family has r = 1: every patch position lies inside one
window. The rule (the paper's Algorithm 1) on an image, possibly patched:

1. the one-mask predictions F(x, m) for every window m; unanimous: output that label;
2. otherwise, with y_maj their majority: the first window d (in window order) whose prediction
   differs from y_maj and whose two-mask predictions F(x, {d, j}) for every j all equal it
   outputs that label; if no such window, output y_maj.

certified(x, y) iff every one-mask and two-mask prediction equals y, each beating its
runner-up by the config's margin. Then any patch, inside some window m*, leaves the
predictions with m* (masked pixels replace the patch) equal to those on x, so the rule
outputs y: DESIGN-NOTES "Certified recovery" proves it. The certificate never alerts.

This module also holds what every double-masking method shares (:class:`RecoveryRule`, the
method object; :func:`recover`, the batched driver): a variant brings its own
:class:`LabelRule` (the second round) and predictor. :func:`recover` runs the rule for a batch
of images with work avoidance: the clean image's second round runs only where its first round
disagrees, a disagreeing window's check stops at its first pair that disagrees with it, and a
certificate stops at its first pair that fails. Pair predictions are kept per unordered pair,
so a pair two checks need runs once. :func:`recovered_label` is the rule on a full map of
predictions, which ``full=True`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from scalecert.config import CertConfig
from scalecert.masks import MaskFamily
from scalecert.methods import masking
from scalecert.methods.base import (
    ALERT,
    NO_BOX,
    Evaluation,
    MaskedPredictor,
    Pairs,
    PreparedBatch,
    undefended_or_base,
)
from scalecert.methods.registry import method_info
from scalecert.models.base import StagedClassifier

# (image index, first window, second window or None for one-mask inputs) -> predictions, margins
PairRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                   tuple[torch.Tensor, torch.Tensor]]


def predictor(model: StagedClassifier, config: CertConfig) -> masking.OcclusionPredictor:
    """F(x, m) and F(x, {a, b}): the whole model on occluded pixels (as the masking baseline)."""
    return masking.predictor(model, config)


def build(model: StagedClassifier, config: CertConfig) -> "RecoveryRule":
    """Double masking on occluded pixels; shares the prepared images with masking."""
    return RecoveryRule(predictor(model, config), config, DOUBLE_MASKING,
                        preparation_key=(masking.PIXELS_KEY,))


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Fine-tuning trains the one-mask forward pass, the masking baseline's (random windows of
    the family; PatchCleanser's paper trains with such cutout)."""
    return masking.defended_logits(model, config, images, windows)


class Task(Protocol):
    """One image's second round (or certificate) under work avoidance: it advances over the
    pairs known and asks for the next ones it needs."""

    output: int | None  # the decided label (None: keep the first round's)

    def settle(self, pairs: "PairTable", image: int) -> bool:
        """Advance over the pairs known; True once decided (then ``output`` holds)."""
        ...

    def wanted(self, pairs: "PairTable", image: int, limit: int) -> list[int]:
        """Up to ``limit`` pair numbers, not known yet, to run next."""
        ...


class LabelRule(Protocol):
    """The second round of a double-masking method: the recovered label of an image whose
    one-mask predictions disagree, on a full map or by asking for pairs."""

    def on_full_map(self, one: np.ndarray, two: np.ndarray) -> int:
        """The label from ``one`` (n one-mask predictions) and ``two`` (n x n two-mask)."""
        ...

    def task(self, one: np.ndarray, pairs: "PairTable") -> Task:
        """Work avoidance's task for one image's (disagreeing) one-mask predictions."""
        ...


@dataclass(frozen=True)
class Recovery:
    """The rule's results on N images."""

    one_mask: torch.Tensor  # N x n one-mask predictions
    output: torch.Tensor  # N, the recovered label (never ALERT)
    min_margin: torch.Tensor  # N: least margin over the predictions known (see recover)
    n_evaluated: torch.Tensor  # N: masked inputs run through the model (one- and two-mask)


def recover(
    run: PairRun,
    base: torch.Tensor,
    base_margin: torch.Tensor,
    needed: torch.Tensor,
    labels: torch.Tensor | None,
    margin: float,
    batch_size: int,
    full: bool,
    rule: "LabelRule | None" = None,
) -> Recovery:
    """The rule (``rule``: the second round, double masking's by default), and with ``labels``
    the certificate, for N images and n windows.

    ``base``/``base_margin``: the unmasked prediction and its margin, which a window (or pair)
    the predictor proves harmless (``needed`` False; for both windows of a pair) takes without
    a run. ``run`` computes the others, ``batch_size`` pairs at a time across images. With
    ``full`` every needed pair runs and the rule reads the full map; otherwise work avoidance,
    with the same outcomes. ``min_margin`` (margins towards the label) covers the one-mask
    predictions and the pairs known; it is >= ``margin`` exactly when the image is certified.
    """
    rule = DOUBLE_MASKING if rule is None else rule
    n_images, n_masks = needed.shape
    image_of, mask_of = needed.nonzero(as_tuple=True)
    predictions, margins = run(image_of, mask_of, None)
    one = base[:, None].repeat(1, n_masks)
    one_margin = base_margin[:, None].repeat(1, n_masks).to(torch.float32)
    one[image_of, mask_of] = predictions
    one_margin[image_of, mask_of] = margins.to(torch.float32)
    pairs = PairTable(run, base, base_margin, needed)
    pairs.count_one_mask(image_of)
    one_np, one_margin_np = one.numpy(), one_margin.numpy()
    if full:
        pairs.run_all()
        output = [int(one_np[i, 0]) if bool((one_np[i] == one_np[i, 0]).all())
                  else rule.on_full_map(one_np[i], pairs.matrix(i)) for i in range(n_images)]
    else:
        output = _recover_avoiding_work(pairs, one_np, one_margin_np, labels, margin, batch_size,
                                        rule)
    least = one_margin_np.min(axis=1)
    known_margin = np.where(pairs.known, pairs.margin, np.inf).min(axis=1)
    return Recovery(
        one_mask=one,
        output=torch.tensor(output, dtype=torch.int64),
        min_margin=torch.from_numpy(np.minimum(least, known_margin).astype(np.float32)),
        n_evaluated=torch.from_numpy(pairs.evaluated.copy()),
    )


class PairTable:
    """Two-mask predictions per image and unordered pair, filled as they are run."""

    def __init__(self, run: PairRun, base: torch.Tensor, base_margin: torch.Tensor,
                 needed: torch.Tensor) -> None:
        n_images, n_masks = needed.shape
        self.run_pairs = run
        first, second = torch.triu_indices(n_masks, n_masks, offset=1)
        self.first, self.second = first.numpy(), second.numpy()
        index = np.full((n_masks, n_masks), -1, dtype=np.int64)
        index[self.first, self.second] = np.arange(len(self.first))
        index[self.second, self.first] = np.arange(len(self.first))
        self.index = index  # window pair -> pair number
        need = needed.numpy()
        self.needed = need[:, self.first] | need[:, self.second]  # N x P
        self.known = ~self.needed
        self.prediction = np.repeat(base.numpy()[:, None], len(self.first), axis=1)
        self.margin = np.repeat(base_margin.numpy().astype(np.float32)[:, None],
                                len(self.first), axis=1)
        self.evaluated = np.zeros(n_images, dtype=np.int64)

    def count_one_mask(self, image_of: torch.Tensor) -> None:
        self.evaluated += np.bincount(image_of.numpy(), minlength=len(self.evaluated))

    def run(self, images: list[int], pair_numbers: list[int]) -> None:
        """Run the given (image, pair number) entries, none of them known yet."""
        if not images:
            return
        image_index, numbers = np.asarray(images), np.asarray(pair_numbers)
        predictions, margins = self.run_pairs(
            torch.from_numpy(image_index), torch.from_numpy(self.first[numbers]),
            torch.from_numpy(self.second[numbers]))
        self.prediction[image_index, numbers] = predictions.numpy()
        self.margin[image_index, numbers] = margins.numpy()
        self.known[image_index, numbers] = True
        self.evaluated += np.bincount(image_index, minlength=len(self.evaluated))

    def run_all(self) -> None:
        images, numbers = np.nonzero(~self.known)
        self.run(images.tolist(), numbers.tolist())

    def matrix(self, image: int) -> np.ndarray:
        """The image's n x n two-mask predictions (all pairs known; the diagonal -1)."""
        full = self.prediction[image][self.index]
        np.fill_diagonal(full, -1)
        return full


@dataclass
class _Check:
    """A run of pairs that passes when all are known and none fails: the certificate (fails
    on a margin below the config's) or a disagreeing window's check (fails on a prediction
    other than the window's label)."""

    queue: list[int]  # pair numbers, in the order to try them
    label: int | None  # the window's label, the output if it passes; None: the certificate
    position: int = 0


class Checks:
    """Checks tried in turn (a :class:`Task`): the first that passes decides the output (its
    window's label; the certificate keeps the first round's); a failing one gives way to the
    next; none left: ``fallback``."""

    def __init__(self, checks: list[_Check], fallback: int | None, margin: float) -> None:
        self.checks = checks
        self.output = fallback
        self.margin = margin

    def settle(self, pairs: PairTable, image: int) -> bool:
        checks = self.checks
        while checks:
            check = checks[0]
            queue = check.queue
            failed = False
            while check.position < len(queue) and pairs.known[image, queue[check.position]]:
                p = queue[check.position]
                if (pairs.margin[image, p] < self.margin if check.label is None
                        else int(pairs.prediction[image, p]) != check.label):
                    failed = True
                    break
                check.position += 1
            if failed:
                checks.pop(0)
                continue
            if check.position == len(queue):  # passed: a window check decides the output
                if check.label is not None:
                    self.output = check.label
                checks.clear()
                return True
            return False
        return True

    def wanted(self, pairs: PairTable, image: int, limit: int) -> list[int]:
        check = self.checks[0]
        ahead = check.queue[check.position:check.position + 4 * limit]
        return [p for p in ahead if not pairs.known[image, p]][:limit]


def majority(labels: np.ndarray) -> int:
    """The most frequent label; a tie goes to the smallest (any choice keeps the proof)."""
    return int(np.bincount(labels).argmax())


class DoubleMasking:
    """PatchCleanser's second round (:class:`LabelRule`): the first disagreeing window (in
    window order) whose two-mask predictions all keep its label wins; otherwise the majority."""

    def on_full_map(self, one: np.ndarray, two: np.ndarray) -> int:
        return recovered_label(one, two)

    def task(self, one: np.ndarray, pairs: PairTable) -> Checks:
        most = majority(one)
        n_masks = len(one)
        checks = []
        for d in np.nonzero(one != most)[0].tolist():
            label = int(one[d])
            others = [j for j in range(n_masks) if j != d]
            # windows that already disagree with d's label are the likeliest to fail its check
            others.sort(key=lambda j: int(one[j]) == label)
            checks.append(_Check(pairs.index[d, others].tolist(), label))
        return Checks(checks, most, margin=0.0)


DOUBLE_MASKING = DoubleMasking()


def recovered_label(one: np.ndarray, two: np.ndarray) -> int:
    """Double masking on one image's full map: ``one`` its n one-mask predictions, ``two`` the
    n x n symmetric two-mask predictions (the diagonal unused)."""
    if bool((one == one[0]).all()):
        return int(one[0])
    most = majority(one)
    for d in range(len(one)):
        label = int(one[d])
        if label != most and all(int(two[d, j]) == label for j in range(len(one)) if j != d):
            return label
    return most


def _recover_avoiding_work(
    pairs: PairTable, one: np.ndarray, one_margin: np.ndarray, labels: torch.Tensor | None,
    margin: float, batch_size: int, rule: LabelRule,
) -> list[int]:
    """The rule with work avoidance; fills ``pairs`` with what it ran (see :func:`recover`).
    A unanimous image's output is decided; its task is the certificate (if the first round
    allows one). A disagreeing image cannot be certified; its task is the rule's second
    round. Images share the pairs' runs round by round."""
    n_images = len(one)
    output = [0] * n_images
    tasks: dict[int, Task] = {}
    for i in range(n_images):
        row = one[i]
        if bool((row == row[0]).all()):
            output[i] = int(row[0])
            certifiable = (labels is not None and int(row[0]) == int(labels[i])
                           and bool((one_margin[i] >= margin).all()))
            if certifiable:  # weakest windows' pairs first: a failing pair is found early
                order = np.argsort(one_margin[i][pairs.first] + one_margin[i][pairs.second],
                                   kind="stable")
                tasks[i] = Checks([_Check(order.tolist(), None)], None, margin)
            continue
        tasks[i] = rule.task(row, pairs)
    while tasks:
        for i in list(tasks):
            if tasks[i].settle(pairs, i):
                if tasks[i].output is not None:
                    output[i] = tasks[i].output
                del tasks[i]
        if not tasks:
            break
        per_image = max(1, batch_size // len(tasks))
        images, numbers = [], []
        for i, task in tasks.items():
            wanted = task.wanted(pairs, i, per_image)
            images += [i] * len(wanted)
            numbers += wanted
        pairs.run(images, numbers)
    return output


class RecoveryRule:
    """A double-masking method (:class:`~scalecert.methods.base.Method`): one- and two-mask
    predictions of ``predictor``, second round ``rule``, certificate as PatchCleanser's."""

    def __init__(self, predictor: MaskedPredictor, config: CertConfig, rule: LabelRule,
                 preparation_key: Hashable) -> None:
        self.predictor = predictor
        self.config = config
        self.rule = rule
        self.pruned = method_info(config.method).pruned  # M is the SIN-pruned model
        self.preparation_key = preparation_key

    def evaluate(self, batch: PreparedBatch, labels: torch.Tensor | None, family: MaskFamily,
                 pairs: Pairs, full_map: bool) -> Evaluation:
        boxes = family.boxes()
        priority = self.predictor.evaluation_priority(batch, boxes)
        unmasked = pairs.unmasked(batch, labels)
        base = unmasked.predictions

        def run(image_index: torch.Tensor, first: torch.Tensor,
                second: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            windows = boxes[first] if second is None else torch.stack(
                (boxes[first], boxes[second]), dim=1)
            runs = pairs.run(batch, image_index, windows, labels)
            return runs.predictions, runs.margins

        outcome = recover(run, base, unmasked.margins, priority > 0, labels, self.config.margin,
                          pairs.batch_size, full=full_map, rule=self.rule)
        n_images = len(batch)
        no_confidence = torch.full((n_images,), float("nan"))  # a detection rule's figure
        certified = (outcome.min_margin >= self.config.margin if labels is not None
                     else torch.zeros(n_images, dtype=torch.bool))
        return Evaluation(
            base, undefended_or_base(self.pruned, batch, labels, base, pairs), outcome.one_mask,
            outcome.n_evaluated, outcome.min_margin, outcome.output,
            torch.tensor([NO_BOX]).repeat(n_images, 1),
            torch.full((n_images,), ALERT, dtype=torch.int64), no_confidence, no_confidence,
            certified)
