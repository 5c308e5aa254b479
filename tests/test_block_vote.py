"""The block-vote rule (``CertConfig(vote="majority")``, r >= 2): detection alerts unless every
r x r block's strict majority is M(z); certified(x, y) needs M(x) = y and, in every block, a
strict majority of windows predicting y with the margin. On real CIFAR-10 JPEGs with the
committed ScaleCert checkpoint: the outcomes follow from the full map, and a certified image
patched anywhere (random and crafted patches) ends in its label or ALERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support import assert_scalecert_detection_is_sound

from pipeline.cli import main
from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.methods.base import NO_MAJORITY
from scalecert.methods.detection import block_votes, robust_block_majorities
from scalecert.errors import InvalidOption

PATCH = 5
CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet20-scalecert-2.4.pt"


def test_block_votes_are_strict_majorities() -> None:
    grid = torch.tensor([[[1, 1, 2],
                          [1, 2, 2],
                          [3, 3, 2]]])
    # 2 x 2 blocks: {1,1,1,2} -> 1; {1,2,2,2} -> 2; {1,2,3,3} -> none; {2,2,3,2} -> 2
    assert block_votes(grid, 2, num_classes=4).tolist() == [[[1, 2], [NO_MAJORITY, 2]]]
    # a tie is no strict majority
    assert block_votes(torch.tensor([[[0, 0], [1, 1]]]), 2, 2).tolist() == [[[NO_MAJORITY]]]
    robust = torch.tensor([[[True, True, False], [True, False, True], [True, True, True]]])
    # blocks hold 3, 2, 3, 3 robust windows: the second is no strict majority of 4
    assert robust_block_majorities(robust, 2).tolist() == [False]
    assert robust_block_majorities(torch.ones(1, 3, 3, dtype=torch.bool), 2).tolist() == [True]


@pytest.mark.parametrize(("options", "message"), [
    ({"vote": "most"}, "vote: one of unanimous, majority, got 'most'"),
    ({"vote": "majority"}, "vote: majority needs r >= 2"),
    ({"vote": "majority", "r": 2, "method": "patchcleanser"},
     "r: method patchcleanser needs r = 1"),
])
def test_bad_votes_are_refused(options, message) -> None:
    with pytest.raises(InvalidOption, match=message):
        CertConfig(patch_px=PATCH, **options)


def test_cli_refuses_a_majority_vote_with_r_1_before_any_work(tmp_path) -> None:
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, ["certify", "--data", str(tmp_path / "absent"), "--model",
                                        "cifar_resnet20", "--patch", "5", "--out", str(out),
                                        "--vote", "majority"])
    assert refused.exit_code == 2 and "--vote: majority needs r >= 2" in refused.output
    assert not out.exists()


@pytest.fixture(scope="module")
def voted(cifar10_test_dir):
    torch.set_num_threads(2)
    images, labels = load_image_folder(cifar10_test_dir, per_class=3)
    model = load_model("cifar_resnet20", CHECKPOINT)
    certifier = Certifier(model, CertConfig(patch_px=PATCH, r=2, masks_per_axis=7,
                                            vote="majority"))
    return certifier, images, labels, certifier.certify(images, labels)


def test_outcomes_follow_from_the_full_map(voted) -> None:
    certifier, images, labels, result = voted
    family = certifier.mask_family(32)
    grid = result.mask_predictions.view(len(images), *family.grid_shape)
    votes = block_votes(grid, 2, 10).flatten(1)
    differs = (votes != result.prediction[:, None]).any(dim=1)
    assert torch.equal(result.clean_output == ALERT, differs)
    assert bool((result.clean_output[~differs] == result.prediction[~differs]).all())
    assert bool((result.alert_box[differs] >= 0).all())
    assert bool((result.alert_box[~differs] == -1).all())
    # a certified image: every block votes its label, so the clean image keeps it
    certified = result.certified
    assert 0 < int(certified.sum()) < len(images)
    assert bool((result.clean_output[certified] == labels[certified]).all())
    assert bool((votes[certified] == labels[certified, None]).all())
    # the majority rule certifies images the unanimous block rule does not (its point)
    unanimous = Certifier(certifier.model, CertConfig(patch_px=PATCH, r=2, masks_per_axis=7))
    assert int(certified.sum()) > int(unanimous.certify(images, labels).certified.sum())


@pytest.mark.slow
def test_a_certified_image_is_never_misclassified_by_the_vote(voted) -> None:
    certifier, images, labels, result = voted
    index = int(result.certified.nonzero()[0, 0])
    image, label = images[index], int(labels[index])
    assert_scalecert_detection_is_sound(certifier, image, label, PATCH, seed=2)
