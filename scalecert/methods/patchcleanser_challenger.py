"""PatchCleanser's challenger masking: double masking's certificate, a cheaper recovered label.

The one-mask predictions F(x, m) are double masking's. When they disagree, a game replaces the
second round (the reference implementation's ``challenger_masking``, the paper's appendix):
window 0 starts as the candidate; while the windows not yet eliminated disagree, the first of
them (in window order) whose label differs from the candidate's challenges it, and the two-mask
prediction F(x, {candidate, challenger}) decides: the challenger's label -> the candidate is
eliminated and the challenger becomes the candidate; otherwise the challenger is eliminated.
The output is the last candidate's label. Each game eliminates a window, so at most n - 1
two-mask inputs run, against up to n per disagreeing window for double masking.

The certificate is double masking's (every one- and two-mask prediction is y, with the margin),
and it holds for this rule too: with the patch inside window m*, every prediction with m* is
y. m* is never eliminated: as candidate, a challenger's label differs from y while
F(x, {m*, c}) = y; as challenger (its label y differs from the candidate's),
F(x, {c, m*}) = y is its label. The game ends when the windows left agree; m* is among them and
so is the candidate, so the output is y (DESIGN-NOTES "Challenger masking").
"""

from __future__ import annotations

import numpy as np
import torch

from scalecert.config import CertConfig
from scalecert.methods import masking
from scalecert.methods.patchcleanser import PairTable, RecoveryRule
from scalecert.models.base import StagedClassifier


def predictor(model: StagedClassifier, config: CertConfig) -> masking.OcclusionPredictor:
    """F(x, m) and F(x, {a, b}): the whole model on occluded pixels (as double masking)."""
    return masking.predictor(model, config)


def build(model: StagedClassifier, config: CertConfig) -> RecoveryRule:
    """Challenger masking on occluded pixels; shares the prepared images with masking."""
    return RecoveryRule(predictor(model, config), config, CHALLENGER,
                        preparation_key=(masking.PIXELS_KEY,))


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Fine-tuning trains the one-mask forward pass, as for double masking."""
    return masking.defended_logits(model, config, images, windows)


def challenger_label(one: np.ndarray, two: np.ndarray) -> int:
    """The game on one image's full map: ``one`` its n one-mask predictions, ``two`` the n x n
    symmetric two-mask predictions (the diagonal unused)."""
    game = Game(one)
    while (pair := game.next_pair()) is not None:
        game.play(int(two[pair]))
    return game.label


class Game:
    """The challenger game's state for one image: the candidate, and the windows eliminated."""

    def __init__(self, one: np.ndarray) -> None:
        self.one = one
        self.candidate = 0
        self.alive = np.ones(len(one), dtype=bool)
        self.challenger: int | None = None

    @property
    def label(self) -> int:
        return int(self.one[self.candidate])

    def next_pair(self) -> tuple[int, int] | None:
        """(candidate, challenger) of the next game, or None once the windows left agree."""
        differs = self.alive & (self.one != self.one[self.candidate])
        if not differs.any():  # the candidate is alive, so the windows left all share its label
            return None
        self.challenger = int(np.argmax(differs))  # the first in window order
        return self.candidate, self.challenger

    def play(self, prediction: int) -> None:
        """The two-mask prediction of the pair :meth:`next_pair` named decides the game."""
        challenger = self.challenger
        if prediction == int(self.one[challenger]):
            self.alive[self.candidate] = False
            self.candidate = challenger
        else:
            self.alive[challenger] = False
        self.challenger = None


class _GameTask:
    """Work avoidance's task (:class:`~scalecert.methods.patchcleanser.Task`): the game, one
    pair at a time, each asked for when the game reaches it."""

    def __init__(self, one: np.ndarray) -> None:
        self.game = Game(one)
        self.output: int | None = None
        self.pending: tuple[int, int] | None = None

    def settle(self, pairs: PairTable, image: int) -> bool:
        while True:
            if self.pending is None:
                self.pending = self.game.next_pair()
                if self.pending is None:
                    self.output = self.game.label
                    return True
            number = int(pairs.index[self.pending])
            if not pairs.known[image, number]:
                return False
            self.game.play(int(pairs.prediction[image, number]))
            self.pending = None

    def wanted(self, pairs: PairTable, image: int, limit: int) -> list[int]:
        return [int(pairs.index[self.pending])]  # settle left a pending pair, not known yet


class Challenger:
    """The challenger game as a :class:`~scalecert.methods.patchcleanser.LabelRule`."""

    def on_full_map(self, one: np.ndarray, two: np.ndarray) -> int:
        return challenger_label(one, two)

    def task(self, one: np.ndarray, pairs: PairTable) -> _GameTask:
        return _GameTask(one)


CHALLENGER = Challenger()
