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

:func:`recover` runs the rule for a batch of images with work avoidance: the clean image's
second round runs only where its first round disagrees, a disagreeing window's check stops at
its first pair that disagrees with it, and a certificate stops at its first pair that fails.
Pair predictions are kept per unordered pair, so a pair two checks need runs once.
:func:`recovered_label` is the rule on a full map of predictions, which ``full=True`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from scalecert.baselines import OcclusionPredictor
from scalecert.config import CertConfig
from scalecert.methods import masking
from scalecert.models.base import StagedClassifier

# (image index, first window, second window or None for one-mask inputs) -> predictions, margins
PairRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                   tuple[torch.Tensor, torch.Tensor]]


def predictor(model: StagedClassifier, config: CertConfig) -> OcclusionPredictor:
    """F(x, m) and F(x, {a, b}): the whole model on occluded pixels (as the masking baseline)."""
    return masking.predictor(model, config)


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Fine-tuning trains the one-mask forward pass, the masking baseline's (random windows of
    the family; PatchCleanser's paper trains with such cutout)."""
    return masking.defended_logits(model, config, images, windows)


def majority(labels: np.ndarray) -> int:
    """The most frequent label; a tie goes to the smallest (any choice keeps the proof)."""
    return int(np.bincount(labels).argmax())


def recovered_label(one: np.ndarray, two: np.ndarray) -> int:
    """The rule on one image's full map: ``one`` its n one-mask predictions, ``two`` the
    n x n symmetric two-mask predictions (the diagonal unused)."""
    if bool((one == one[0]).all()):
        return int(one[0])
    most = majority(one)
    for d in range(len(one)):
        label = int(one[d])
        if label != most and all(int(two[d, j]) == label for j in range(len(one)) if j != d):
            return label
    return most


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
) -> Recovery:
    """The rule, and with ``labels`` the certificate, for N images and n windows.

    ``base``/``base_margin``: the unmasked prediction and its margin, which a window (or pair)
    the predictor proves harmless (``needed`` False; for both windows of a pair) takes without
    a run. ``run`` computes the others, ``batch_size`` pairs at a time across images. With
    ``full`` every needed pair runs and the rule reads the full map
    (:func:`recovered_label`); otherwise work avoidance, with the same outcomes.
    ``min_margin`` (margins towards the label) covers the one-mask predictions and the pairs
    known; it is >= ``margin`` exactly when the image is certified.
    """
    n_images, n_masks = needed.shape
    image_of, mask_of = needed.nonzero(as_tuple=True)
    predictions, margins = run(image_of, mask_of, None)
    one = base[:, None].repeat(1, n_masks)
    one_margin = base_margin[:, None].repeat(1, n_masks).to(torch.float32)
    one[image_of, mask_of] = predictions
    one_margin[image_of, mask_of] = margins.to(torch.float32)
    pairs = _PairTable(run, base, base_margin, needed)
    pairs.count_one_mask(image_of)
    one_np, one_margin_np = one.numpy(), one_margin.numpy()
    if full:
        pairs.run_all()
        output = [recovered_label(one_np[i], pairs.matrix(i)) for i in range(n_images)]
    else:
        output = _recover_avoiding_work(pairs, one_np, one_margin_np, labels, margin, batch_size)
    least = one_margin_np.min(axis=1)
    known_margin = np.where(pairs.known, pairs.margin, np.inf).min(axis=1)
    return Recovery(
        one_mask=one,
        output=torch.tensor(output, dtype=torch.int64),
        min_margin=torch.from_numpy(np.minimum(least, known_margin).astype(np.float32)),
        n_evaluated=torch.from_numpy(pairs.evaluated.copy()),
    )


class _PairTable:
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
        """The image's n x n two-mask predictions (all pairs known)."""
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


def _recover_avoiding_work(
    pairs: _PairTable, one: np.ndarray, one_margin: np.ndarray, labels: torch.Tensor | None,
    margin: float, batch_size: int,
) -> list[int]:
    """The rule with work avoidance; fills ``pairs`` with what it ran (see :func:`recover`)."""
    n_images, n_masks = one.shape
    output = [0] * n_images  # until a check passes: the unanimous label or the majority
    checks: list[list[_Check]] = [[] for _ in range(n_images)]
    for i in range(n_images):
        row = one[i]
        if bool((row == row[0]).all()):
            output[i] = int(row[0])
            certifiable = (labels is not None and int(row[0]) == int(labels[i])
                           and bool((one_margin[i] >= margin).all()))
            if certifiable:  # weakest windows' pairs first: a failing pair is found early
                order = np.argsort(one_margin[i][pairs.first] + one_margin[i][pairs.second],
                                   kind="stable")
                checks[i] = [_Check(order.tolist(), None)]
            continue
        most = majority(row)
        for d in np.nonzero(row != most)[0].tolist():
            label = int(row[d])
            others = [j for j in range(n_masks) if j != d]
            # windows that already disagree with d's label are the likeliest to fail its check
            others.sort(key=lambda j: int(row[j]) == label)
            checks[i].append(_Check(pairs.index[d, others].tolist(), label))
        output[i] = most
    active = [i for i in range(n_images) if checks[i]]
    while active:
        for i in active:
            _settle(i, checks[i], pairs, margin, output)
        active = [i for i in active if checks[i]]
        if not active:
            break
        per_image = max(1, batch_size // len(active))
        images, numbers = [], []
        for i in active:
            check = checks[i][0]
            wanted = [p for p in check.queue[check.position:check.position + 4 * per_image]
                      if not pairs.known[i, p]][:per_image]
            images += [i] * len(wanted)
            numbers += wanted
        pairs.run(images, numbers)
    return output


def _settle(i: int, checks: list[_Check], pairs: _PairTable, margin: float,
            output: list[int]) -> None:
    """Advance image i's checks over the pairs known, as far as they decide: a check that
    fails gives way to the next (none left: the output stays), one that passes decides."""
    while checks:
        check = checks[0]
        queue = check.queue
        failed = False
        while check.position < len(queue) and pairs.known[i, queue[check.position]]:
            p = queue[check.position]
            if (pairs.margin[i, p] < margin if check.label is None
                    else int(pairs.prediction[i, p]) != check.label):
                failed = True
                break
            check.position += 1
        if failed:
            checks.pop(0)
            continue
        if check.position == len(queue):  # passed: a window check decides the output
            if check.label is not None:
                output[i] = check.label
            checks.clear()
        return
