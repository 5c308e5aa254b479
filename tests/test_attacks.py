"""Patch attacks on the committed CIFAR-10 ResNet-20s and real test JPEGs: each attack does
what its objective claims (fools the model, reaches the target, trains a universal patch
that beats noise, keeps the superficial activation low, moves every window of the detector),
changes nothing outside its box, is reproducible, and refuses bad options before any work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.attacks import (
    AttackConfig,
    attack_images,
    attack_logits,
    grid_boxes,
    paste_patch,
    patch_activation,
    random_boxes,
    train_universal_patch,
)
from scalecert.errors import InvalidOption

MODELS = Path(__file__).resolve().parents[1] / "models"
MASKING = CertConfig(patch_px=5, method="masking")
SCALECERT = CertConfig(patch_px=5, method="scalecert")


@pytest.fixture(scope="module")
def masking_model():
    return load_model("cifar_resnet20", MODELS / "cifar10-resnet20-masking-2.4.pt")


@pytest.fixture(scope="module")
def scalecert_model():
    return load_model("cifar_resnet20", MODELS / "cifar10-resnet20-scalecert-2.4.pt")


@pytest.fixture(scope="module")
def test_images(cifar10_test_dir):
    """The first 3 test JPEGs of every class (30 images)."""
    return load_image_folder(cifar10_test_dir, per_class=3)


def predictions(logits_of, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(images).argmax(dim=1)


def right_only(logits_of, images, labels, limit):
    """The first ``limit`` images the model classifies right."""
    right = predictions(logits_of, images) == labels
    return images[right][:limit], labels[right][:limit]


# -- fooling ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "cert", "attack_model"), [
    ("masking_model", MASKING, "undefended"),
    ("scalecert_model", SCALECERT, "defended"),
])
def test_per_image_attack_fools_a_real_model(request, test_images, model_name, cert,
                                             attack_model):
    model = request.getfixturevalue(model_name)
    logits_of = attack_logits(model, cert, attack_model)
    images, labels = right_only(logits_of, *test_images, limit=10)
    config = AttackConfig(patch_px=5, steps=10, restarts=1)
    result = attack_images(model, cert, images, labels, config, attack_model=attack_model)
    fooled = predictions(logits_of, result.images) != labels
    assert fooled.float().mean() >= 0.7, fooled
    # the reported objective is the margin loss: positive exactly where the model is fooled
    assert torch.equal(result.loss > 0, fooled)
    # early stop: a fooled image took no more steps than the budget, and some took fewer
    assert int(result.steps.max()) <= config.steps and int(result.steps.min()) < config.steps


@pytest.mark.slow
def test_targeted_attack_reaches_the_target(masking_model, test_images):
    images, labels = test_images
    target = 3  # cat
    images, labels = right_only(masking_model, images[labels != target], labels[labels != target],
                                limit=10)
    config = AttackConfig(patch_px=5, steps=15, restarts=2, target=target)
    result = attack_images(masking_model, MASKING, images, labels, config,
                           attack_model="undefended")
    reached = predictions(masking_model, result.images) == target
    assert reached.float().mean() >= 0.6, reached
    assert torch.equal(result.loss > 0, reached)  # the target's margin


# -- boxes, pixels, determinism ---------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"location": "worst"}, {"location": "random"}, {"eot": 2}, {"attack": "adaptive"},
], ids=["worst", "random", "eot", "adaptive"])
def test_patch_stays_in_its_box_and_runs_are_reproducible(masking_model, options):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=generator)  # small: a 3 x 3 search grid
    labels = torch.tensor([0, 1, 2])
    config = AttackConfig(patch_px=8, steps=2, restarts=2, **options)
    result = attack_images(masking_model, MASKING, images, labels, config)
    boxes = result.boxes
    assert boxes.dtype == torch.int64 and boxes.shape == (3, 4)
    assert bool(((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 16)).all())
    assert torch.equal(boxes[:, 2:] - boxes[:, :2], torch.full((3, 2), 8))
    inside = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    for row, (top, left, bottom, right) in enumerate(boxes.tolist()):
        inside[row, :, top:bottom, left:right] = True
    outside = ~inside.expand_as(images)
    assert torch.equal(result.images[outside], images[outside])
    assert not torch.equal(result.images, images)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    assert result.loss.dtype == torch.float32 and result.steps.dtype == torch.int64
    assert bool((result.steps >= 1).all() & (result.steps <= 4).all())  # 2 restarts x 2 steps
    again = attack_images(masking_model, MASKING, images, labels, config)
    assert torch.equal(again.images, result.images) and torch.equal(again.boxes, boxes)
    assert torch.equal(again.loss, result.loss) and torch.equal(again.steps, result.steps)
    if options == {"location": "random"}:
        other = attack_images(masking_model, MASKING, images, labels, replace(config, seed=1))
        assert not torch.equal(other.images, result.images)


def test_paste_patch_and_boxes():
    generator = torch.Generator().manual_seed(3)
    boxes = random_boxes(50, (20, 24), 7, generator)
    assert bool((boxes[:, :2] >= 0).all() & (boxes[:, 2] <= 20).all() & (boxes[:, 3] <= 24).all())
    assert torch.equal(boxes[:, 2:] - boxes[:, :2], torch.full((50, 2), 7))
    images = torch.zeros(2, 3, 20, 24)
    patch = torch.rand(3, 7, 7, generator=generator)
    pasted = paste_patch(images, patch, torch.tensor([[0, 0, 7, 7], [13, 17, 20, 24]]))
    assert torch.equal(pasted[0, :, :7, :7], patch) and torch.equal(pasted[1, :, 13:, 17:], patch)
    assert int((pasted != 0).sum()) == int((patch != 0).sum()) * 2
    grid = grid_boxes((32, 32), 5)  # every 3 px (half a patch) plus the last position
    assert len(grid) == 100 and grid[:2].tolist() == [[0, 0, 5, 5], [0, 3, 5, 8]]
    assert grid[-1].tolist() == [27, 27, 32, 32]
    with pytest.raises(InvalidOption, match="boxes"):
        paste_patch(images, patch, torch.tensor([[14, 0, 21, 7], [0, 0, 7, 7]]))


def test_attacks_leave_the_model_alone(masking_model):
    """Eval mode during the attack, the caller's mode back after, no parameter gradients, and
    it runs under a caller's no_grad."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masking_model.train()
    try:
        with torch.no_grad():
            attack_images(masking_model, MASKING, images, torch.tensor([0, 1]),
                          AttackConfig(patch_px=4, steps=1, restarts=1))
        assert masking_model.training
        assert all(p.grad is None for p in masking_model.parameters())
    finally:
        masking_model.eval()


# -- universal, adaptive, detector ---------------------------------------------------------

@pytest.mark.slow
def test_universal_patch_beats_a_random_patch_on_held_out_images(masking_model,
                                                                  cifar10_test_dir):
    images, labels = load_image_folder(cifar10_test_dir, per_class=8)
    train = torch.arange(len(images)) % 8 < 5  # 5 per class to train, 3 held out
    config = AttackConfig(patch_px=8, attack="universal", steps=10, step_size=0.1, seed=2)
    patch = train_universal_patch(masking_model, MASKING, images[train], labels[train], config,
                                  attack_model="undefended", batch_size=50, epochs=1)
    assert patch.shape == (3, 8, 8)
    held_images, held_labels = images[~train], labels[~train]
    noise = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    accuracy = {}
    for name, candidate in (("trained", patch), ("noise", noise)):
        result = attack_images(masking_model, MASKING, held_images, held_labels, config,
                               attack_model="undefended", universal_patch=candidate)
        assert int(result.steps.sum()) == 0
        accuracy[name] = float((predictions(masking_model, result.images)
                                == held_labels).float().mean())
    assert accuracy["trained"] < accuracy["noise"] - 0.1, accuracy


@pytest.mark.slow
def test_adaptive_penalty_lowers_the_superficial_activation(scalecert_model, test_images):
    images, labels = right_only(attack_logits(scalecert_model, SCALECERT, "defended"),
                                *test_images, limit=10)
    activation = {}
    for alpha in (0.0, 4.0):
        config = AttackConfig(patch_px=5, attack="adaptive", alpha=alpha, steps=8, restarts=1,
                              location="random")
        result = attack_images(scalecert_model, SCALECERT, images, labels, config)
        with torch.no_grad():
            activation[alpha] = patch_activation(scalecert_model, None, result.images,
                                                 result.boxes)
    assert float(activation[4.0].mean()) < 0.9 * float(activation[0.0].mean()), activation
    assert int((activation[4.0] < activation[0.0]).sum()) >= 8


@pytest.mark.slow
def test_detector_attack_moves_every_window(masking_model, cifar10_test_dir):
    """Where the detector attack succeeds (detection outputs a wrong label, no ALERT), every
    window of the family predicts that label; it never succeeds on a certified image (the
    theorem); and it gets more windows to agree than the per-image attack, which only
    aims at M."""
    cert = CertConfig(patch_px=5, method="masking", masks_per_axis=3)
    images, labels = load_image_folder(cifar10_test_dir, per_class=4)  # 36 right, 22 certified
    certifier = Certifier(masking_model, cert)
    clean = certifier.certify(images, labels)
    # images that are right but not certified: the only ones the attack can win on
    chosen = ((clean.prediction == labels) & ~clean.certified).nonzero()[:8, 0]
    chosen = torch.cat([chosen, clean.certified.nonzero()[:2, 0]])
    images, labels = images[chosen], labels[chosen]
    certified = clean.certified[chosen]
    config = AttackConfig(patch_px=5, attack="detector", steps=15, restarts=1)
    result = attack_images(masking_model, cert, images, labels, config)
    detected = certifier.detect(result.images)
    won = (detected.output != ALERT) & (detected.output != labels)
    assert int(won.sum()) >= 2, detected.output
    assert not bool((won & certified).any())
    windows = detected.mask_predictions
    assert bool((windows[won] == detected.output[won, None]).all())
    per_image = attack_images(masking_model, cert, images, labels,
                              replace(config, attack="per-image", location="random"))
    baseline = certifier.detect(per_image.images)

    def agreement(detection):
        return float((detection.mask_predictions == detection.prediction[:, None])
                     .float().mean())
    assert agreement(detected) > agreement(baseline)


# -- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"attack": "pixel"}, "attack: one of per-image, universal"),
    ({"steps": 0}, "steps: must be >= 1, got 0"),
    ({"restarts": 0}, "restarts: must be >= 1"),
    ({"step_size": 0.0}, r"step_size: must be in \(0, 1\], got 0.0"),
    ({"step_size": 1.5}, r"step_size: must be in \(0, 1\], got 1.5"),
    ({"alpha": -1.0}, "alpha: must be a finite number >= 0, got -1.0"),
    ({"eot": 0}, "eot: must be >= 1, got 0"),
    ({"location": "center"}, "location: one of worst, random, got 'center'"),
    ({"target": -1}, "target: must be >= 0, got -1"),
    ({"patch_px": 0}, "patch_px: must be >= 1, got 0"),
    ({"steps": 2.5}, "steps: must be an integer, got 2.5"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(InvalidOption, match=message):
        AttackConfig(**{"patch_px": 5, **options})


class _NoWork(torch.nn.Module):
    """A model that must never run: the refusals come before any work."""

    num_classes = 10

    def forward(self, images):  # pragma: no cover - failing is the point
        raise AssertionError("the model ran")

    def split(self, layer=None):  # pragma: no cover
        raise AssertionError("the model was split")


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=33)),
     "patch_px: a 33 px patch is larger than the images"),
    (lambda m, x, y: attack_images(m, MASKING, x, y[:3], AttackConfig(patch_px=5)),
     "labels: expected 4 labels"),
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=5,
                                                                  attack="universal")),
     "universal_patch: the universal attack needs a trained patch"),
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=5, attack="universal"),
                                   universal_patch=torch.rand(3, 4, 4)),
     "universal_patch: expected 3 x 5 x 5"),
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=5, target=10)),
     "target: must be < 10"),
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=5),
                                   attack_model="vanilla"),
     "attack_model: one of undefended, defended, got 'vanilla'"),
    (lambda m, x, y: attack_images(m, MASKING, x, y, AttackConfig(patch_px=5, attack="detector"),
                                   attack_model="undefended"),
     "attack_model: the detector attack fools the defense itself"),
    (lambda m, x, y: train_universal_patch(m, MASKING, x, y, AttackConfig(patch_px=5),
                                           batch_size=0),
     "batch_size: must be >= 1, got 0"),
    (lambda m, x, y: attack_logits(m, MASKING, "pruned"),
     "attack_model: one of undefended, defended"),
], ids=["patch", "labels", "no-universal", "universal-shape", "target", "attack-model",
        "detector-undefended", "batch-size", "logits"])
def test_bad_inputs_are_refused_before_any_work(call, message):
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(InvalidOption, match=message):
        call(_NoWork(), images, labels)
