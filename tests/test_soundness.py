"""The theorem on real data: a certified image, patched anywhere with anything, is never
classified as another label by ``detect`` (it gives the label or ALERT).

Shared ResNet-20 weights and CIFAR-10 test JPEGs; 2.4% patches (5 px on 32 x 32), 6 x 6 masks.
Every one of the 28 x 28 patch positions is tried with all-0, all-1 and random patches, and with
a patch optimised by gradient ascent on the pruned model's loss at that position.

M(x') is computed for every patched image; detection then runs on each one whose M(x') is not the
label (the only ones where a wrong output is possible, since detect outputs M(x') or ALERT) or
nearly is not, and on a sample of the others, where the test checks that claim.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.occlusion import SinPredictor
from scalecert.precision import margins
from scalecert.sin import keep_count, keep_positions, prune, selection_order, sin_scores

pytestmark = pytest.mark.slow

PATCH = 5
CERTIFIED_IMAGES_TESTED = 2
UNFOOLED_SAMPLE = 48  # patched images per variant that keep the label, also run through detect
NEAR_TIE = 0.01  # logits: a patched image whose label leads by less is detected as if fooled


def patch_all_positions(image: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """One copy of ``image`` per patch position, with ``patch`` (P x 3 x p x p or 3 x p x p)."""
    side = image.shape[-1]
    positions = [(top, left) for top in range(side - PATCH + 1) for left in range(side - PATCH + 1)]
    patched = image.expand(len(positions), -1, -1, -1).clone()
    patches = patch.expand(len(positions), -1, -1, -1)
    for index, (top, left) in enumerate(positions):
        patched[index, :, top:top + PATCH, left:left + PATCH] = patches[index]
    return patched


def patch_masks(count_side: int, image_side: int) -> torch.Tensor:
    """``P x 1 x H x W`` bool masks of the patch squares, in patch_all_positions' order."""
    masks = torch.zeros(count_side * count_side, 1, image_side, image_side, dtype=torch.bool)
    for index in range(count_side * count_side):
        top, left = divmod(index, count_side)
        masks[index, :, top:top + PATCH, left:left + PATCH] = True
    return masks


def pruned_logits(predictor: SinPredictor, images: torch.Tensor) -> torch.Tensor:
    """M's logits written out from the definitions (stem, SIN top-k of the whole map, head);
    differentiable in ``images`` through the kept features."""
    features = predictor.stem(images)
    order = selection_order(sin_scores(features.detach()))
    k = keep_count(predictor.top_k, features.shape[2:])
    keep = keep_positions(order, torch.zeros_like(order, dtype=torch.bool), k)
    return predictor.head(prune(features, keep))


def optimised_patches(predictor: SinPredictor, image: torch.Tensor, label: int,
                      steps: int = 6) -> torch.Tensor:
    """Per position, a patch found by signed-gradient ascent on the pruned model's loss
    (the SIN selection is recomputed at every step; gradients flow through kept features)."""
    side = image.shape[-1]
    masks = patch_masks(side - PATCH + 1, side)
    generator = torch.Generator().manual_seed(7)
    pixels = torch.rand(len(masks), 3, side, side, generator=generator)
    base = image.expand(len(masks), -1, -1, -1)
    targets = torch.full((len(masks),), label)
    for _ in range(steps):
        pixels.requires_grad_(True)
        loss = F.cross_entropy(pruned_logits(predictor, torch.where(masks, pixels, base)), targets)
        (gradient,) = torch.autograd.grad(loss, pixels)
        pixels = (pixels.detach() + 0.25 * gradient.sign()).clamp(0, 1)
    return torch.where(masks, pixels, base).detach()


@pytest.fixture(scope="module")
def certified_case(cifar10_test_dir, resnet20_checkpoint):
    torch.set_num_threads(2)
    images, labels = load_image_folder(cifar10_test_dir, per_class=12)
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    certifier = Certifier(model, CertConfig(patch_px=PATCH, top_k=0.15, masks_per_axis=6))
    result = certifier.certify(images, labels)
    chosen = result.certified.nonzero()[:, 0][:CERTIFIED_IMAGES_TESTED]
    assert len(chosen) == CERTIFIED_IMAGES_TESTED, (
        f"only {int(result.certified.sum())} of {len(images)} images certified")
    return certifier, images[chosen], labels[chosen]


def test_certified_images_are_never_misclassified_under_any_patch(certified_case) -> None:
    certifier, images, labels = certified_case
    predictor = certifier.predictor
    assert isinstance(predictor, SinPredictor)
    generator = torch.Generator().manual_seed(0)
    fooled_pruned_model = 0
    for image, label in zip(images, labels.tolist()):
        positions = (image.shape[-1] - PATCH + 1) ** 2
        variants = {
            "zeros": patch_all_positions(image, torch.zeros(3, PATCH, PATCH)),
            "ones": patch_all_positions(image, torch.ones(3, PATCH, PATCH)),
            "random": patch_all_positions(image, torch.rand(positions, 3, PATCH, PATCH,
                                                            generator=generator)),
            "optimised": optimised_patches(predictor, image, label),
        }
        for name, patched in variants.items():
            assert len(patched) == positions == 784
            with torch.no_grad():
                logits = torch.cat([pruned_logits(predictor, part) for part in patched.split(196)])
            fooled = logits.argmax(dim=1) != label
            # near-ties too: there the library's M(x') (other batch shapes) may round the other way
            needed = fooled | (margins(logits, torch.full((len(logits),), label)) < NEAR_TIE)
            kept = (~needed).nonzero()[:, 0]
            sample = kept[torch.randperm(len(kept), generator=generator)[:UNFOOLED_SAMPLE]]
            checked = torch.cat([needed.nonzero()[:, 0], sample])
            result = certifier.detect(patched[checked])
            wrong = (result.output != label) & (result.output != ALERT)
            assert not bool(wrong.any()), (
                f"{name} patch: detect returned another label at positions "
                f"{checked[wrong].tolist()[:10]}")
            # detect outputs M(x') or ALERT, and where the patch changed M's prediction it alerts
            assert bool(((result.output == result.prediction) | (result.output == ALERT)).all())
            assert bool((result.output[result.prediction != label] == ALERT).all()), name
            fooled_pruned_model += int(fooled.sum())
    # the optimised patches do fool the undefended prediction M(x'), so the alerts were needed
    assert fooled_pruned_model > 0
