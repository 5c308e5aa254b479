"""Square-patch attacks on [0, 1] images: the empirical side of the certificates.

A patch is ``C x p x p`` free pixels pasted over a ``p x p`` box of the image; nothing outside
the box changes. Every attack maximises an objective by signed-gradient ascent (PGD) on the
patch pixels only:

- ``per-image``: the margin loss on the attacked model, max_{j != y} z_j - z_y (untargeted,
  CW style) or z_t - max_{j != t} z_j (targeted at t). Per image, the patch stops once it
  fools with margin :data:`STOP_MARGIN`.
- ``universal``: one patch for all images (the paper's Eq. 3), trained by
  :func:`train_universal_patch` at random locations and pasted at random locations.
- ``adaptive`` (the paper's Eq. 6): the margin loss minus ``alpha`` times the mean SIN score
  of the superficial features the patch can influence, so the patch fools M while keeping its
  superficial neurons quiet (to slip through SIN pruning).
- ``detector``: the wrong label's margin averaged over M(x') and F(x', m) for every window m
  of the certification family: detection outputs that wrong label only if no window
  disagrees with M(x').

Randomness comes from one ``torch.Generator`` seeded by ``AttackConfig.seed``; the model runs
in eval mode and only the patch pixels receive gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from scalecert.attack_registry import DEFAULT_ATTACK, attack_info, available_attacks
from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.geometry import Footprints
from scalecert.methods import load_method
from scalecert.models.base import StagedClassifier
from scalecert.precision import margins
from scalecert.sin import sin_scores
from scalecert.training import training_windows

ATTACK_MODELS = ("undefended", "defended")
LOCATIONS = ("worst", "random")
# A patch that fools with this logit margin stops early (per image): the fooling survives
# the float noise between batch compositions that the certificates' own margin covers.
STOP_MARGIN = 1.0
# Pixels per forward-and-backward pass (1,024 CIFAR images, 20 at 224 x 224): bounds memory;
# a detector step runs every window of each image, so its passes hold fewer images.
PASS_PIXELS = 1024 * 32 * 32


@dataclass(frozen=True)
class AttackConfig:
    """How to attack: the patch side, the attack, and its optimisation budget.

    patch_px: side of the square patch (>= 1). attack: a registered attack
        (:mod:`scalecert.attack_registry`).
    steps: signed-gradient steps per restart (>= 1); restarts (>= 1): per image, the restart
        that fools with margin, else the one with the highest final objective, wins (an image
        fooled with margin skips the remaining restarts).
    step_size: the signed-gradient step on pixel values, in (0, 1].
    location: "worst" (per image, the positions of a grid every half patch, ranked by the
        objective of a noise patch there; restart r starts at the r-th best) or "random" (a
        fresh random position per restart).
    eot: positions averaged per step (expectation over locations); 1 keeps the patch where it
        starts, > 1 draws ``eot`` random positions per step and a random final position.
    alpha: adaptive only, the weight of the superficial-activation penalty (>= 0).
    target: the class aimed at (None: untargeted). seed: of every random draw.
    """

    patch_px: int
    attack: str = DEFAULT_ATTACK
    steps: int = 40
    restarts: int = 2
    step_size: float = 1 / 16
    location: str = "worst"
    eot: int = 1
    alpha: float = 1.0
    target: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("patch_px", 1), ("steps", 1), ("restarts", 1), ("eot", 1),
                              ("seed", 0)):
            _check_int(name, getattr(self, name), minimum)
        attack_info(self.attack)  # an unknown attack is refused with the choices
        if self.location not in LOCATIONS:
            raise InvalidOption(
                f"location: one of {', '.join(LOCATIONS)}, got {self.location!r}")
        if not _finite(self.step_size) or not 0.0 < self.step_size <= 1.0:
            raise InvalidOption(f"step_size: must be in (0, 1], got {self.step_size!r}")
        if not _finite(self.alpha) or self.alpha < 0:
            raise InvalidOption(f"alpha: must be a finite number >= 0, got {self.alpha!r}")
        if self.target is not None:
            _check_int("target", self.target, 0)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), for run fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class AttackResult:
    """Attacked images and what it took, per image."""

    images: torch.Tensor  # N x C x H x W attacked images in [0, 1]
    boxes: torch.Tensor  # N x 4 int64 (top, left, bottom, right), ends exclusive
    loss: torch.Tensor  # N float32, the objective at the end (higher: stronger attack)
    steps: torch.Tensor  # N int64, gradient steps spent, over all restarts (the "worst"
    # location search runs forward passes only, which are not steps)


# -- the attacked forward passes ------------------------------------------------------------

def attack_logits(
    model: StagedClassifier, cert: CertConfig, attack_model: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits an attack optimises against, differentiable in the images.

    "undefended": the plain unpruned forward ``model(images)``. "defended": the method's M,
    ``defended_logits(model, cert, images, empty windows)`` of its module (SIN-pruned for
    scalecert, the unpruned model for masking)."""
    _check_attack_model(attack_model)
    if attack_model == "undefended":
        return model
    method = load_method(cert.method)

    def defended(images: torch.Tensor) -> torch.Tensor:
        windows = torch.zeros((len(images), 4), dtype=torch.int64, device=images.device)
        return method.defended_logits(model, cert, images, windows)

    return defended


# -- patches and boxes ----------------------------------------------------------------------

def paste_patch(images: torch.Tensor, patch: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``images`` with ``patch`` (``C x p x p``, or ``N x C x p x p``) pasted at ``boxes``
    (``N x 4``, each ``p x p`` inside the image); differentiable in both, a new tensor."""
    n, channels, height, width = images.shape
    if patch.dim() == 3:
        patch = patch.expand(n, -1, -1, -1)
    side = patch.shape[-1]
    if patch.shape != (n, channels, side, side):
        raise InvalidOption(f"patch: expected {channels} x p x p or {n} x {channels} x p x p, "
                            f"got {tuple(patch.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.int64).reshape(-1, 4).to(images.device)
    top, left, bottom, right = boxes.unbind(1)
    if len(boxes) != n or bool(((bottom - top != side) | (right - left != side) | (top < 0)
                                | (left < 0) | (bottom > height) | (right > width)).any()):
        raise InvalidOption(f"boxes: expected {n} boxes of {side} x {side} px inside "
                            f"{height} x {width} images")
    rows = torch.arange(height, device=images.device)[None] - top[:, None]  # n x H
    cols = torch.arange(width, device=images.device)[None] - left[:, None]  # n x W
    tall = patch.to(images.dtype).gather(
        2, rows.clamp(0, side - 1)[:, None, :, None].expand(n, channels, height, side))
    full = tall.gather(3, cols.clamp(0, side - 1)[:, None, None, :].expand(
        n, channels, height, width))
    inside = (((rows >= 0) & (rows < side))[:, None, :, None]
              & ((cols >= 0) & (cols < side))[:, None, None, :])
    return torch.where(inside, full, images)


def random_boxes(
    count: int, image_hw: tuple[int, int], patch_px: int, generator: torch.Generator
) -> torch.Tensor:
    """``count x 4`` int64 boxes of ``patch_px`` at uniformly random positions in the image."""
    height, width = image_hw
    _check_fits(patch_px, image_hw)
    tops = torch.randint(0, height - patch_px + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - patch_px + 1, (count,), generator=generator)
    return torch.stack([tops, lefts, tops + patch_px, lefts + patch_px], dim=1)


def grid_boxes(image_hw: tuple[int, int], patch_px: int) -> torch.Tensor:
    """The grid of the "worst" location search: positions every ``ceil(patch_px / 2)`` pixels
    per axis, plus the last position so that the grid reaches every border (row-major).

    Half a patch, not a whole one: no position is then more than a quarter patch from a grid
    point. On 179 CIFAR-10 test JPEGs and the ResNet-20, a 5 px per-image attack (40 steps, 2
    restarts) fooled 91.1% with a 5 px grid, 92.7% with this 3 px one, 93.3% with 2 px."""
    stride = (patch_px + 1) // 2
    axes = []
    for side in image_hw:
        starts = list(range(0, side - patch_px + 1, stride))
        if starts[-1] != side - patch_px:
            starts.append(side - patch_px)
        axes.append(starts)
    return torch.tensor([(t, l, t + patch_px, l + patch_px) for t in axes[0] for l in axes[1]],
                        dtype=torch.int64)


def patch_activation(
    model: StagedClassifier, layer: str | None, images: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """``N``: the mean SIN score (:func:`~scalecert.sin.sin_scores` of the stem features) over
    the superficial positions whose receptive field meets each image's box: the activation
    the adaptive attack's penalty (Eq. 6) keeps low. Differentiable in the images."""
    split = model.split(layer)
    features = split.stem(images)
    foot = Footprints(split.geometry, tuple(features.shape[2:]))(boxes)
    return _mean_under(sin_scores(features), foot)


def _mean_under(scores: torch.Tensor, foot: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of ``scores`` (``N x P``) over the ``foot`` positions (``N x P``)."""
    foot = foot.to(scores.device)
    return (scores * foot).sum(dim=1) / foot.sum(dim=1).clamp(min=1)


# -- objectives -----------------------------------------------------------------------------

class _Objective:
    """An attack's objective on a batch of images: :meth:`loss` of the images ``rows`` attacked
    at ``boxes`` gives the objective (higher: stronger) and whether each is fooled with margin
    (None: the attack never stops early). This one is the margin loss of the per-image and
    universal attacks; the other attacks' objectives below refine it, one class each
    (:data:`_OBJECTIVES`)."""

    def __init__(self, model: StagedClassifier, cert: CertConfig, config: AttackConfig,
                 attack_model: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.cert, self.config = model, cert, config
        self.labels = labels.to(images.device)
        self.logits = attack_logits(model, cert, attack_model)
        self.forwards = 1  # forward passes of the model per attacked image

    def loss(self, patched: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        margin = self._margin(self.logits(patched), self.labels[rows])
        return margin, margin >= STOP_MARGIN

    def position_scores(self, boxes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """How promising each (image ``rows``, position ``boxes``) pair is for the "worst"
        location search without running the model, or None: then a noise patch ranks them
        (:func:`_rank_positions`)."""
        return None

    def _margin(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Untargeted: best wrong logit minus the label's; targeted: the target's margin."""
        if self.config.target is None:
            return -margins(logits, labels)
        return margins(logits, torch.full_like(labels, self.config.target))


class _AdaptiveObjective(_Objective):
    """The paper's Eq. 6: the margin loss minus ``alpha`` times the mean SIN score under the
    patch; it never stops early."""

    def __init__(self, model: StagedClassifier, cert: CertConfig, config: AttackConfig,
                 attack_model: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(model, cert, config, attack_model, images, labels)
        self.split = model.split(cert.layer)
        self.footprints: Footprints | None = None

    def loss(self, patched: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        margin = self._margin(self.logits(patched), self.labels[rows])
        return margin - self.config.alpha * self.activation(patched, boxes), None

    def activation(self, patched: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        features = self.split.stem(patched)
        if self.footprints is None:
            self.footprints = Footprints(self.split.geometry, tuple(features.shape[2:]))
        return _mean_under(sin_scores(features), self.footprints(boxes))


class _DetectorObjective(_Objective):
    """The wrong label's margin averaged over M(x') and F(x', m) for every window m of the
    family: detection outputs that wrong label only if no window disagrees with M(x')."""

    def __init__(self, model: StagedClassifier, cert: CertConfig, config: AttackConfig,
                 attack_model: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(model, cert, config, attack_model, images, labels)
        self.method = load_method(cert.method)
        self.windows = training_windows(cert, (images.shape[2], images.shape[3]))
        self.forwards = len(self.windows) + 1
        self.clean = self._clean_window_margins(images)

    def loss(self, patched: torch.Tensor, boxes: torch.Tensor, rows: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fooled when M(x') and every window's F(x', m) give the wrong label with margin."""
        n, windows = len(patched), self.windows.to(patched.device)
        k = len(windows)
        unmasked = torch.zeros((1, 4), dtype=torch.int64, device=patched.device)
        pairs = torch.cat([unmasked, windows]).repeat(n, 1)  # image-major: M, then windows
        logits = self.method.defended_logits(
            self.model, self.cert, patched.repeat_interleave(k + 1, dim=0), pairs)
        wrong, _ = self.wrong_labels(boxes, rows)
        per_pair = margins(logits, wrong.to(logits.device).repeat_interleave(k + 1))
        per_pair = per_pair.view(n, k + 1)
        return per_pair.mean(dim=1), per_pair.amin(dim=1) >= STOP_MARGIN

    def position_scores(self, boxes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """How close the windows that contain each position already are to a wrong label on
        the clean image (:meth:`wrong_labels`): those windows cannot be moved by the patch,
        and everything else can."""
        return self.wrong_labels(boxes, rows)[1]

    @torch.no_grad()
    def _clean_window_margins(self, images: torch.Tensor) -> torch.Tensor:
        """``N x K x classes`` (CPU): each class's margin, logit minus the best other logit,
        under every window of the family on the clean images."""
        n, k = len(images), len(self.windows)
        windows = self.windows.to(images.device)
        per_pass = max(1, 4 * _rows_per_pass((images.shape[2], images.shape[3])) // k)
        parts = []
        for start in range(0, n, per_pass):
            batch = images[start:start + per_pass]
            logits = self.method.defended_logits(
                self.model, self.cert, batch.repeat_interleave(k, dim=0),
                windows.repeat(len(batch), 1))
            parts.append(_all_margins(logits.float()).view(len(batch), k, -1).cpu())
        return torch.cat(parts)

    def wrong_labels(self, boxes: torch.Tensor, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The label a detector attack at ``boxes`` aims at, and how close the windows that
        contain the box already are to it (their least margin for it on the clean image).

        Those windows see none of the patch, so they keep their clean predictions (the
        detection theorem): detection can output a wrong label only if they already predict
        it. So the label is the target, or the wrong class they are closest to predicting."""
        windows, boxes = self.windows, boxes.cpu()
        contains = ((windows[None, :, 0] <= boxes[:, None, 0])
                    & (windows[None, :, 1] <= boxes[:, None, 1])
                    & (windows[None, :, 2] >= boxes[:, None, 2])
                    & (windows[None, :, 3] >= boxes[:, None, 3]))  # n x K
        clean = self.clean[rows.cpu()].masked_fill(~contains[:, :, None], math.inf)
        closest = clean.amin(dim=1)  # n x classes: the least margin over containing windows
        closest = closest.scatter(1, self.labels[rows].cpu()[:, None], -math.inf)
        if self.config.target is not None:
            wrong = torch.full((len(boxes),), self.config.target, dtype=torch.int64)
            return wrong, closest[:, self.config.target]
        score, wrong = closest.max(dim=1)
        return wrong, score


# Each registered attack's objective (scalecert.attack_registry names them); the universal
# attack optimises its one patch against the margin loss (train_universal_patch).
_OBJECTIVES: dict[str, type[_Objective]] = {
    "per-image": _Objective,
    "universal": _Objective,
    "adaptive": _AdaptiveObjective,
    "detector": _DetectorObjective,
}
if set(_OBJECTIVES) != set(available_attacks()):
    raise ImportError(f"scalecert.attacks: objectives for {sorted(_OBJECTIVES)}, registered "
                      f"attacks {sorted(available_attacks())}")


def _objective(model: StagedClassifier, cert: CertConfig, config: AttackConfig,
               attack_model: str, images: torch.Tensor, labels: torch.Tensor) -> _Objective:
    """The objective of ``config.attack`` on these images."""
    return _OBJECTIVES[config.attack](model, cert, config, attack_model, images, labels)


def _all_margins(logits: torch.Tensor) -> torch.Tensor:
    """``n x classes``: every class's logit minus the best other logit."""
    top2 = logits.topk(2, dim=1).values
    best_other = torch.where(logits >= top2[:, :1], top2[:, 1:2], top2[:, :1])
    return logits - best_other


# -- the attacks ----------------------------------------------------------------------------

def attack_images(
    model: StagedClassifier,
    cert: CertConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    attack_model: str = "defended",
    universal_patch: torch.Tensor | None = None,
) -> AttackResult:
    """Attack each image (``N x C x H x W`` in [0, 1]) with a ``config.patch_px`` patch.

    per-image / adaptive / detector: optimise the patch pixels of each image against
    ``attack_model`` (the detector attack fools the defense itself, so it needs "defended").
    universal: paste ``universal_patch`` (``C x p x p``, required) at random locations seeded
    by ``config.seed``; nothing is optimised (``steps`` 0)."""
    labels = _check_inputs(model, images, labels, config, attack_model)
    trains_patch = attack_info(config.attack).trains_patch
    if trains_patch:
        if universal_patch is None:
            raise InvalidOption("universal_patch: the universal attack needs a trained patch "
                                "(train_universal_patch)")
        _check_patch(universal_patch, images.shape[1], config.patch_px)
    elif universal_patch is not None:
        raise InvalidOption(f"universal_patch: only the universal attack takes one, "
                            f"not {config.attack!r}")
    generator = torch.Generator().manual_seed(config.seed)
    n, image_hw = len(images), (images.shape[2], images.shape[3])
    with _eval_mode(model), torch.enable_grad():
        objective = _objective(model, cert, config, attack_model, images, labels)
        if trains_patch:
            boxes = random_boxes(n, image_hw, config.patch_px, generator)
            patch = universal_patch.detach().to(images.device, images.dtype)
            attacked = paste_patch(images, patch, boxes)
            with torch.no_grad():
                loss, _ = objective.loss(attacked, boxes, torch.arange(n, device=images.device))
            return AttackResult(attacked.detach(), boxes, loss.float().cpu(),
                                torch.zeros(n, dtype=torch.int64))
        chunk = max(1, _rows_per_pass(image_hw) // (objective.forwards * config.eot))
        parts = [_optimise(objective, images[start:start + chunk],
                           torch.arange(start, min(start + chunk, n), device=images.device),
                           config, generator)
                 for start in range(0, n, chunk)]
    return AttackResult(*(torch.cat(field) for field in zip(*(
        (part.images, part.boxes, part.loss, part.steps) for part in parts))))


def _optimise(objective: _Objective, images: torch.Tensor, rows: torch.Tensor,
              config: AttackConfig, generator: torch.Generator) -> AttackResult:
    """PGD on each image's own patch (``images`` are the objective's ``rows``): ``restarts``
    runs of ``steps`` signed-gradient steps, each from uniform noise, at the position the
    location rule gives. Per image the restart that fools with margin, else the one with the
    highest final objective, wins; an image fooled with margin skips the remaining restarts."""
    n, channels, height, width = images.shape
    device, p = images.device, config.patch_px
    best_loss = torch.full((n,), -math.inf)
    best_success = torch.zeros(n, dtype=torch.bool)
    best_patch = torch.zeros((n, channels, p, p), dtype=images.dtype, device=device)
    best_boxes = torch.zeros((n, 4), dtype=torch.int64)
    spent = torch.zeros(n, dtype=torch.int64)
    ranked = None
    if config.eot == 1 and config.location == "worst":
        ranked = _rank_positions(objective, images, rows, config, generator)
    for restart in range(config.restarts):
        todo = (~best_success).nonzero()[:, 0]
        if len(todo) == 0:
            break
        start = torch.rand((len(todo), channels, p, p), generator=generator)
        start = start.to(device, images.dtype)
        if config.eot > 1:
            patch, loss, boxes = _eot_run(objective, images[todo.to(device)],
                                          rows[todo.to(device)], start, config, generator)
            success = torch.zeros(len(todo), dtype=torch.bool)
            spent[todo] += config.steps
        else:
            if ranked is None:
                boxes = random_boxes(len(todo), (height, width), p, generator)
            else:
                grid, order = ranked
                boxes = grid[order[todo, restart % order.shape[1]]]
            patch, loss, success, took = _fixed_run(
                objective, images[todo.to(device)], rows[todo.to(device)], start, boxes,
                config)
            spent[todo] += took
        better = (success & ~best_success[todo]) | (
            (success == best_success[todo]) & (loss > best_loss[todo]))
        chosen = todo[better]
        best_loss[chosen] = loss[better]
        best_success[chosen] = success[better]
        best_patch[chosen.to(device)] = patch[better.to(device)]
        best_boxes[chosen] = boxes[better]
    attacked = paste_patch(images, best_patch, best_boxes)
    return AttackResult(attacked.detach(), best_boxes, best_loss.float(), spent)


def _fixed_run(objective: _Objective, images: torch.Tensor, rows: torch.Tensor,
               patch: torch.Tensor, boxes: torch.Tensor, config: AttackConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One restart with the patch at fixed ``boxes``. Returns per image the best iterate, its
    objective, whether it fools with margin and the steps taken: an image stops at its first
    iterate that fools with margin (never, for the adaptive objective)."""
    device = images.device
    best = patch.clone()
    best_loss = torch.full((len(images),), -math.inf)
    success = torch.zeros(len(images), dtype=torch.bool)
    took = torch.zeros(len(images), dtype=torch.int64)
    for step in range(config.steps + 1):  # the extra pass evaluates the last update
        live = (~success).nonzero()[:, 0]
        if len(live) == 0:
            break
        last = step == config.steps
        count, live = len(live), _padded(live, len(images))
        live_dev = live.to(device)
        pixels = patch[live_dev].detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            attacked = paste_patch(images[live_dev], pixels, boxes[live])
            loss, fooled = objective.loss(attacked, boxes[live], rows[live_dev])
        if not last:  # the padding rows' losses are left out, so they get no gradient
            (gradient,) = torch.autograd.grad(loss[:count].sum(), pixels)
        live, live_dev, pixels = live[:count], live_dev[:count], pixels[:count]
        loss = loss[:count].detach().float().cpu()
        fooled = None if fooled is None else fooled[:count]
        if not last:
            gradient = gradient[:count]
            took[live] += 1
        better = loss > best_loss[live]
        best_loss[live[better]] = loss[better]
        best[live_dev[better.to(device)]] = pixels.detach()[better.to(device)]
        if fooled is not None:
            success[live[fooled.cpu()]] = True  # stops here: its best iterate is this one
        if not last:  # (an image just fooled is not live again, whatever its patch)
            patch[live_dev] = (pixels.detach() + config.step_size * gradient.sign()).clamp_(
                0.0, 1.0)
    return best, best_loss, success, took


def _padded(live: torch.Tensor, total: int) -> torch.Tensor:
    """``live`` padded with copies of its first entry to the next power of two (at most
    ``total``): the batches an early-stopping attack runs then take a few shapes, not one per
    count of images left, and on the CPU each new shape costs oneDNN a fresh setup of every
    convolution (measured: 20 new batch sizes 3x slower than 20 seen ones)."""
    size = min(total, 1 << max(0, len(live) - 1).bit_length())
    return torch.cat([live, live[:1].expand(size - len(live))])


def _eot_run(objective: _Objective, images: torch.Tensor, rows: torch.Tensor,
             patch: torch.Tensor, config: AttackConfig, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One restart with the gradient averaged over ``eot`` random positions per step; the
    final patch goes to a random position, where its objective is taken."""
    height, width = images.shape[2:]
    n, e = len(images), config.eot
    originals = images.repeat_interleave(e, dim=0)
    pair_rows = rows.repeat_interleave(e)
    for _ in range(config.steps):
        boxes = random_boxes(n * e, (height, width), config.patch_px, generator)
        pixels = patch.detach().requires_grad_(True)
        attacked = paste_patch(originals, pixels.repeat_interleave(e, dim=0), boxes)
        loss, _ = objective.loss(attacked, boxes, pair_rows)
        (gradient,) = torch.autograd.grad(loss.sum() / e, pixels)
        patch = (pixels.detach() + config.step_size * gradient.sign()).clamp_(0.0, 1.0)
    boxes = random_boxes(n, (height, width), config.patch_px, generator)
    with torch.no_grad():
        loss, _ = objective.loss(paste_patch(images, patch, boxes), boxes, rows)
    return patch, loss.float().cpu(), boxes


@torch.no_grad()
def _rank_positions(objective: _Objective, images: torch.Tensor, rows: torch.Tensor,
                    config: AttackConfig, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The "worst" location search: per image, the grid's positions ranked best first
    (ties in grid order). Returns the grid (``G x 4``) and ``N x G`` indices into it.

    A position's rank is the objective of one uniform-noise patch pasted there; for the
    detector attack it is how close the windows that contain the position already are to a
    wrong label on the clean image (:meth:`_Objective.wrong_labels`), since those windows
    cannot be moved by the patch and everything else can."""
    n, channels = images.shape[:2]
    image_hw = (images.shape[2], images.shape[3])
    grid = grid_boxes(image_hw, config.patch_px)
    g = len(grid)
    pair_image = torch.arange(n, device=images.device).repeat_interleave(g)
    pair_box = grid.repeat(n, 1)
    scores = objective.position_scores(pair_box, rows[pair_image])
    if scores is None:
        noise = torch.rand((n, channels, config.patch_px, config.patch_px), generator=generator)
        noise = noise.to(images.device, images.dtype)
        scores = torch.empty(n * g)
        per_pass = 4 * _rows_per_pass(image_hw)  # no gradients: larger passes
        for start in range(0, n * g, per_pass):
            image = pair_image[start:start + per_pass]
            boxes = pair_box[start:start + per_pass]
            loss, _ = objective.loss(paste_patch(images[image], noise[image], boxes), boxes,
                                     rows[image])
            scores[start:start + per_pass] = loss.float().cpu()
    order = torch.sort(scores.view(n, g), dim=1, descending=True, stable=True).indices
    return grid, order


def _rows_per_pass(image_hw: tuple[int, int]) -> int:
    """Images per forward-and-backward pass: :data:`PASS_PIXELS` pixels' worth."""
    return max(1, PASS_PIXELS // (image_hw[0] * image_hw[1]))


def train_universal_patch(
    model: StagedClassifier,
    cert: CertConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    attack_model: str = "defended",
    batch_size: int = 128,
    epochs: int = 1,
) -> torch.Tensor:
    """One patch (``C x p x p``) for every image, the paper's Eq. 3: maximise the mean
    objective (the target's margin, or the untargeted margin loss) over images and random
    locations. Each epoch visits the images in shuffled batches of ``batch_size``; each batch
    gets ``config.steps`` signed-gradient steps, every step at fresh random positions
    (``config.eot`` per image). The step size decays on a cosine from ``config.step_size``
    over all steps, since a stochastic objective needs small final steps to settle."""
    labels = _check_inputs(model, images, labels, config, attack_model)
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        _check_int(name, value, 1)
    generator = torch.Generator().manual_seed(config.seed)
    device, channels = images.device, images.shape[1]
    image_hw = (images.shape[2], images.shape[3])
    per_image = replace(config, attack="per-image")
    e, p = config.eot, config.patch_px
    patch = torch.rand((channels, p, p), generator=generator).to(device, images.dtype)
    batches = math.ceil(len(images) / batch_size)
    total = epochs * batches * config.steps
    done = 0
    with _eval_mode(model), torch.enable_grad():
        objective = _objective(model, cert, per_image, attack_model, images, labels)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for batch in range(batches):
                rows = order[batch * batch_size:(batch + 1) * batch_size].to(device)
                originals = images[rows].repeat_interleave(e, dim=0)
                pair_rows = rows.repeat_interleave(e)
                for _ in range(config.steps):
                    boxes = random_boxes(len(pair_rows), image_hw, p, generator)
                    pixels = patch.detach().requires_grad_(True)
                    loss, _ = objective.loss(paste_patch(originals, pixels, boxes), boxes,
                                             pair_rows)
                    (gradient,) = torch.autograd.grad(loss.mean(), pixels)
                    size = config.step_size * 0.5 * (1 + math.cos(math.pi * done / total))
                    patch = (pixels.detach() + size * gradient.sign()).clamp_(0.0, 1.0)
                    done += 1
    return patch.detach()


# -- checks and helpers ---------------------------------------------------------------------

@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (BatchNorm statistics stay put), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_inputs(model: StagedClassifier, images: torch.Tensor, labels: torch.Tensor,
                  config: AttackConfig, attack_model: str) -> torch.Tensor:
    """Refuse bad inputs before any work; returns the labels as int64."""
    if not isinstance(config, AttackConfig):
        raise InvalidOption(f"config: expected an AttackConfig, got {type(config).__name__}")
    _check_attack_model(attack_model)
    if attack_info(config.attack).defended_only and attack_model != "defended":
        raise InvalidOption(f"attack_model: the {config.attack} attack fools the defense itself "
                            f"(M and its windows); use 'defended', got {attack_model!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise InvalidOption("images: expected an N x C x H x W float tensor in [0, 1], got "
                            f"{getattr(images, 'shape', type(images).__name__)}")
    if len(images) == 0:
        raise InvalidOption("images: the batch is empty")
    _check_fits(config.patch_px, (images.shape[2], images.shape[3]))
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != len(images):
        raise InvalidOption(f"labels: expected {len(images)} labels (one per image), got shape "
                            f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InvalidOption(f"labels: expected integers, got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    num_classes = model.num_classes
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise InvalidOption(f"labels: values must lie in [0, {num_classes})")
    if config.target is not None and config.target >= num_classes:
        raise InvalidOption(f"target: must be < {num_classes} (the model's classes), "
                            f"got {config.target}")
    return labels


def _check_attack_model(attack_model: str) -> None:
    if attack_model not in ATTACK_MODELS:
        raise InvalidOption(
            f"attack_model: one of {', '.join(ATTACK_MODELS)}, got {attack_model!r}")


def _check_fits(patch_px: int, image_hw: tuple[int, int]) -> None:
    if patch_px > min(image_hw):
        raise InvalidOption(f"patch_px: a {patch_px} px patch is larger than the images "
                            f"({image_hw[0]}x{image_hw[1]})")


def _check_patch(patch: torch.Tensor, channels: int, patch_px: int) -> None:
    if not isinstance(patch, torch.Tensor) or tuple(patch.shape) != (channels, patch_px, patch_px):
        raise InvalidOption(f"universal_patch: expected {channels} x {patch_px} x {patch_px}, got "
                            f"{tuple(getattr(patch, 'shape', ()))}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidOption(f"{name}: must be >= {minimum}, got {value}")


def _finite(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))
