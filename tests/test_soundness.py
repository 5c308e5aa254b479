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
from support import crafted_patches, patch_masks, pruned_logits, random_patches

from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.methods.scalecert import SinPredictor
from scalecert.precision import margins

pytestmark = pytest.mark.slow

PATCH = 5
CERTIFIED_IMAGES_TESTED = 2
UNFOOLED_SAMPLE = 48  # patched images per variant that keep the label, also run through detect
NEAR_TIE = 0.01  # logits: a patched image whose label leads by less is detected as if fooled


def constant_patches(image: torch.Tensor, value: float) -> torch.Tensor:
    """``image`` with a patch of ``value`` at every position."""
    masks = patch_masks(image.shape[-1], PATCH)
    return torch.where(masks, torch.full_like(image, value), image.expand(len(masks), -1, -1, -1))


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
            "zeros": constant_patches(image, 0.0),
            "ones": constant_patches(image, 1.0),
            "random": random_patches(image, PATCH, seed=int(torch.randint(1 << 30, (1,),
                                                                         generator=generator))),
            "optimised": crafted_patches(lambda x: pruned_logits(predictor, x), image, label,
                                         PATCH),
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
