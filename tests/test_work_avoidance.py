"""Work avoidance (``full_map=False``, r = 1) on real data: every outcome equals the full map's,
with fewer runs of g, for ``scalecert`` and the ``masking`` baseline alike.

Shared ResNet-20 weights and CIFAR-10 test JPEGs (10 per class); 2.4% patches (5 px on 32 x 32),
6 x 6 masks, SIN top-k 0.15.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.certify import NOT_EVALUATED

pytestmark = pytest.mark.slow

OUTCOMES = ("prediction", "vanilla_prediction", "certified", "clean_output", "alert_box",
            "recovered_prediction")


@pytest.fixture(scope="module")
def cifar_images(cifar10_test_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_test_dir, per_class=10)


@pytest.fixture(scope="module")
def resnet20(resnet20_checkpoint: Path) -> torch.nn.Module:
    return load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)


@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_work_avoidance_on_cifar10_gives_the_full_maps_outcomes(
    cifar_images, resnet20, method
) -> None:
    images, labels = cifar_images
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6, method=method)
    full = Certifier(resnet20, config, full_map=True).certify(images, labels)
    lean = Certifier(resnet20, config, full_map=False).certify(images, labels)

    # the comparison is only informative when both outcomes occur
    assert 0 < int(full.certified.sum()) < len(images)
    assert bool((full.clean_output == ALERT).any())
    assert bool((full.alert_box[:, 0] >= 0).any())
    for name in OUTCOMES:
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    certified = full.certified
    assert torch.equal(lean.min_margin[certified], full.min_margin[certified])
    # not certified: a minimum over fewer predictions, still below the margin
    assert bool((lean.min_margin[~certified] >= full.min_margin[~certified]).all())
    assert bool((lean.min_margin[~certified] < config.margin).all())

    # fewer runs of g: never more per image, all of them for certified images, far fewer in all
    assert bool((lean.n_evaluated <= full.n_evaluated).all())
    assert torch.equal(lean.n_evaluated[certified], full.n_evaluated[certified])
    assert int(lean.n_evaluated.sum()) < 0.6 * int(full.n_evaluated.sum())
    run = lean.mask_predictions != NOT_EVALUATED
    assert torch.equal(lean.mask_predictions[run], full.mask_predictions[run])
    assert torch.equal(run.sum(dim=1), lean.n_evaluated + (full.n_masks - full.n_evaluated))
