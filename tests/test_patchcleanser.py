"""PatchCleanser double masking (certified recovery) and its SIN-pruned variant: the rule,
work avoidance against the full computation, window pairs in both predictors, the option
limits, and on real CIFAR-10 JPEGs consistency with the masking baseline's map and soundness
(a certified image keeps its label under a patch at every position, crafted ones included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import crafted_patches, pruned_logits, random_patches, randomize_batchnorm

from pipeline.cli import main
from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, create_model, load_model
from scalecert.methods.masking import box_masks
from scalecert.errors import InvalidOption
from scalecert.methods.patchcleanser import recover, recovered_label
from scalecert.methods.patchcleanser_challenger import CHALLENGER, challenger_label
from scalecert.sin import keep_count, keep_positions, prune

PATCH = 5
MODELS = Path(__file__).resolve().parent.parent / "models"
MASKING_CHECKPOINT = MODELS / "cifar10-resnet20-masking-2.4.pt"
SCALECERT_CHECKPOINT = MODELS / "cifar10-resnet20-scalecert-2.4.pt"


# -- the rule -------------------------------------------------------------------------------

def symmetric(values: np.ndarray) -> np.ndarray:
    upper = np.triu(values, 1)
    return upper + upper.T


def test_the_rule_on_hand_made_maps() -> None:
    n = 4
    agree = np.full((n, n), 3)
    assert recovered_label(np.array([3, 3, 3, 3]), agree) == 3  # unanimous
    # window 2 disagrees (label 5) and every pair with it says 5: its label wins
    two = agree.copy()
    two[2, :] = two[:, 2] = 5
    assert recovered_label(np.array([3, 3, 5, 3]), two) == 5
    # one pair with window 2 says 3: window 2 fails its check, the majority stays
    two[2, 0] = two[0, 2] = 3
    assert recovered_label(np.array([3, 3, 5, 3]), two) == 3
    # a tie between labels 1 and 7 goes to the smaller; 7's windows fail their checks
    assert recovered_label(np.array([7, 1, 7, 1]), np.ones((n, n), dtype=int)) == 1


class TableRun:
    """A fake model: one-mask and two-mask predictions and margins read from tables, each
    run counted per (image, unordered pair), so repeats show."""

    def __init__(self, one, one_margin, two, two_margin) -> None:
        self.one, self.one_margin, self.two, self.two_margin = one, one_margin, two, two_margin
        self.runs: list[tuple[int, int, int]] = []

    def __call__(self, image_index, first, second):
        image_index, first = image_index.tolist(), first.tolist()
        if second is None:
            self.runs += [(i, a, a) for i, a in zip(image_index, first)]
            return (torch.tensor([self.one[i, a] for i, a in zip(image_index, first)],
                                 dtype=torch.int64),
                    torch.tensor([self.one_margin[i, a] for i, a in zip(image_index, first)]))
        second = second.tolist()
        self.runs += [(i, min(a, b), max(a, b)) for i, a, b in zip(image_index, first, second)]
        return (torch.tensor([self.two[i, a, b] for i, a, b in zip(image_index, first, second)],
                             dtype=torch.int64),
                torch.tensor([self.two_margin[i, a, b]
                              for i, a, b in zip(image_index, first, second)]))


def random_tables(images: int, n: int, seed: int):
    """Maps mostly of the label 0, with disagreeing windows and pairs of a few labels, so that
    every branch of the rule occurs; margins negative exactly where a prediction is not 0."""
    rng = np.random.default_rng(seed)
    one = np.where(rng.random((images, n)) < 0.08, rng.integers(1, 3, (images, n)), 0)
    one[: images // 4] = 0  # some images unanimous in the first round
    two = np.stack([symmetric(np.where(rng.random((n, n)) < 0.03, rng.integers(1, 3, (n, n)), 0))
                    for _ in range(images)])
    for i in range(images):  # a disagreeing window whose pairs all agree with it
        if i % 5 == 1:
            d = int(rng.integers(n))
            one[i, d] = 2
            two[i, d, :] = two[i, :, d] = 2
    one[3::7], two[3::7] = 0, 0  # right everywhere: these get one margin too small below
    margin_of = lambda labels: np.where(labels == 0, rng.uniform(0.01, 2.0, labels.shape),
                                        -rng.uniform(0.1, 2.0, labels.shape))
    two_margin = margin_of(two)
    for i in range(3, images, 7):  # right, but too close to count towards a certificate
        a, b = sorted(rng.choice(n, 2, replace=False))
        two_margin[i, a, b] = 5e-4
    two_margin = np.triu(two_margin, 1) + np.triu(two_margin, 1).transpose(0, 2, 1)
    return one, margin_of(one), two, two_margin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_work_avoidance_gives_the_full_computations_outcomes(seed) -> None:
    images, n = 40, 9
    tables = random_tables(images, n, seed)
    base = torch.zeros(images, dtype=torch.int64)
    base_margin = torch.ones(images)
    needed = torch.ones(images, n, dtype=torch.bool)
    labels = torch.zeros(images, dtype=torch.int64)
    outcomes = {}
    for full in (True, False):
        run = TableRun(*tables)
        outcomes[full] = (recover(run, base, base_margin, needed, labels, 1e-3, 16, full), run)
    (full_result, _), (lean, lean_run) = outcomes[True], outcomes[False]
    assert torch.equal(lean.output, full_result.output)
    assert torch.equal(lean.min_margin >= 1e-3, full_result.min_margin >= 1e-3)
    assert torch.equal(lean.one_mask, full_result.one_mask)
    # the full computation runs n + n(n-1)/2 inputs per image, work avoidance never more,
    # each (image, pair) once, and the counts are those of the model's runs
    assert full_result.n_evaluated.tolist() == [n + n * (n - 1) // 2] * images
    assert len(lean_run.runs) == len(set(lean_run.runs)) == int(lean.n_evaluated.sum())
    assert bool((lean.n_evaluated <= full_result.n_evaluated).all())
    assert int(lean.n_evaluated.sum()) < int(full_result.n_evaluated.sum())
    # and the outcomes are the rule's on each image's full map
    one, one_margin, two, two_margin = tables
    assert lean.output.tolist() == [recovered_label(one[i], two[i]) for i in range(images)]
    certified = lean.min_margin >= 1e-3
    upper = np.triu_indices(n, 1)
    expected = [bool((one_margin[i] >= 1e-3).all() and (two_margin[i][upper] >= 1e-3).all())
                for i in range(images)]
    # margins >= 1e-3 imply the label; some images are right everywhere but too close somewhere
    assert any((one[i] == 0).all() and (two[i][upper] == 0).all() and not expected[i]
               for i in range(images))
    assert certified.tolist() == expected and any(expected) and not all(expected)


def test_the_challenger_game_on_hand_made_maps() -> None:
    n = 4
    assert challenger_label(np.array([3, 3, 3, 3]), np.full((n, n), 3)) == 3  # unanimous
    # window 0 (label 3) is challenged by window 2 (label 5); the pair says 5: window 2 is the
    # candidate, and the windows left (1, 2, 3 with labels 3, 5, 3) still disagree: window 1
    # challenges, the pair {2, 1} says 5, window 1 is out; then window 3, pair {2, 3} says 5
    two = np.full((n, n), 5)
    assert challenger_label(np.array([3, 3, 5, 3]), two) == 5
    # every pair says 3: each challenger (window 2) is eliminated at once
    assert challenger_label(np.array([3, 3, 5, 3]), np.full((n, n), 3)) == 3
    # no majority: window 0's label 7 beats the three 1s when every pair says 7
    assert challenger_label(np.array([7, 1, 1, 1]), np.full((n, n), 7)) == 7
    # games in order: 1 beats 7 (pair {0, 1} says 1), 2's label 4 beats 1, then beats 3's 1
    two = np.full((n, n), 1)
    two[1, 2] = two[2, 1] = two[2, 3] = two[3, 2] = 4
    assert challenger_label(np.array([7, 1, 4, 1]), two) == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_challenger_work_avoidance_gives_the_full_computations_outcomes(seed) -> None:
    """The game asks for its pairs one at a time: the outcomes of the full map, at most n - 1
    two-mask runs for an image whose first round disagrees, and the certificate unchanged."""
    images, n = 40, 9
    tables = random_tables(images, n, seed)
    base = torch.zeros(images, dtype=torch.int64)
    needed = torch.ones(images, n, dtype=torch.bool)
    labels = torch.zeros(images, dtype=torch.int64)
    full_result = recover(TableRun(*tables), base, torch.ones(images), needed, labels, 1e-3, 16,
                          True, rule=CHALLENGER)
    lean = recover(TableRun(*tables), base, torch.ones(images), needed, labels, 1e-3, 16, False,
                   rule=CHALLENGER)
    one, _, two, _ = tables
    assert lean.output.tolist() == full_result.output.tolist() == [
        challenger_label(one[i], two[i]) for i in range(images)]
    assert torch.equal(lean.min_margin >= 1e-3, full_result.min_margin >= 1e-3)
    disagreeing = torch.from_numpy((one != one[:, :1]).any(axis=1))
    assert bool(disagreeing.any())
    assert bool((lean.n_evaluated[disagreeing] <= n + n - 1).all())
    # double masking's certificate: the same images as with its own rule
    double = recover(TableRun(*tables), base, torch.ones(images), needed, labels, 1e-3, 16, False)
    assert torch.equal(lean.min_margin >= 1e-3, double.min_margin >= 1e-3)


def test_windows_proved_harmless_take_the_unmasked_prediction_without_a_run() -> None:
    images, n = 6, 5
    tables = random_tables(images, n, seed=3)
    needed = torch.zeros(images, n, dtype=torch.bool)
    needed[:, 0] = True  # only window 0 changes anything: pairs with it run, others do not
    run = TableRun(*tables)
    result = recover(run, torch.full((images,), 4), torch.full((images,), 0.5), needed, None,
                     1e-3, 8, full=True)
    assert all(0 in (a, b) for _, a, b in run.runs)
    assert result.n_evaluated.tolist() == [1 + (n - 1)] * images
    assert bool((result.one_mask[:, 1:] == 4).all())


# -- window pairs in the predictors ------------------------------------------------------------

def test_pair_inputs_mask_the_union_of_both_windows() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("cifar_resnet20"), seed=1).eval()
    images = torch.rand(3, 3, 32, 32)
    first = torch.tensor([[0, 0, 9, 9], [10, 4, 19, 13], [23, 23, 32, 32]])
    second = torch.tensor([[0, 5, 9, 14], [0, 0, 9, 9], [23, 23, 32, 32]])
    pairs = torch.stack((first, second), dim=1)
    index = torch.arange(3)

    occlusion = Certifier(model, CertConfig(patch_px=PATCH, method="patchcleanser")).predictor
    union = box_masks(first, (32, 32)) | box_masks(second, (32, 32))
    expected = torch.where(union, torch.zeros(()), images)
    assert torch.equal(occlusion.g_inputs(occlusion.prepare(images), index, pairs), expected)

    sin = Certifier(model, CertConfig(patch_px=PATCH, method="patchcleanser_sin")).predictor
    batch = sin.prepare(images)
    feature_hw = tuple(batch.features.shape[2:])
    excluded = sin.footprints(feature_hw, first) | sin.footprints(feature_hw, second)
    keep = keep_positions(batch.order, excluded, keep_count(sin.top_k, feature_hw))
    assert torch.equal(sin.g_inputs(batch, index, pairs), prune(batch.features, keep))
    # a pair of one window twice is that window alone
    same = torch.stack((first, first), dim=1)
    assert torch.equal(sin.g_inputs(batch, index, same), sin.g_inputs(batch, index, first))


# -- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"masks_per_axis": 11}, "masks_per_axis: method patchcleanser takes 2 to 10 masks per axis"),
    ({"masks_per_axis": 1}, "masks_per_axis: method patchcleanser takes 2 to 10"),
    ({"r": 2}, "r: method patchcleanser needs r = 1"),
    ({"mask_stride": 3}, "mask_stride: method patchcleanser takes masks_per_axis"),
])
def test_families_the_method_cannot_certify_with_are_refused(options, message) -> None:
    with pytest.raises(InvalidOption, match=message):
        CertConfig(patch_px=PATCH, method="patchcleanser", **options)
    with pytest.raises(InvalidOption, match=message.replace("patchcleanser", "patchcleanser_sin")):
        CertConfig(patch_px=PATCH, method="patchcleanser_sin", **options)


def test_cli_refuses_too_many_masks_before_any_work(tmp_path) -> None:
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, [
        "certify", "--data", str(tmp_path / "absent"), "--model", "cifar_resnet20",
        "--patch", "5", "--out", str(out), "--method", "masking", "--method", "patchcleanser",
        "--masks-per-axis", "12"])
    assert refused.exit_code == 2, refused.output
    assert "masks-per-axis" in refused.output and "2 to 10 masks per axis" in refused.output
    assert not out.exists()  # refused before the data was listed or anything written


# -- real data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_images(cifar10_test_dir):
    torch.set_num_threads(2)
    return load_image_folder(cifar10_test_dir, per_class=3)


@pytest.fixture(scope="module")
def masking_model():
    return load_model("cifar_resnet20", MASKING_CHECKPOINT)


@pytest.fixture(scope="module")
def cleanser_runs(test_images, masking_model):
    """PatchCleanser on 30 test JPEGs with and without work avoidance, and the masking
    baseline's full map of the same windows."""
    images, labels = test_images
    config = CertConfig(patch_px=PATCH, method="patchcleanser")
    results = {full: Certifier(masking_model, config, full_map=full).certify(images, labels)
               for full in (True, False)}
    masking = Certifier(masking_model, CertConfig(patch_px=PATCH, method="masking"),
                        full_map=True).certify(images, labels)
    return results[True], results[False], masking


def test_real_images_work_avoidance_and_full_map_agree(cleanser_runs, test_images) -> None:
    full, lean, _ = cleanser_runs
    _, labels = test_images
    for name in ("certified", "clean_output", "mask_predictions", "prediction"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    certified = full.certified
    assert torch.equal(lean.min_margin[certified], full.min_margin[certified])
    assert full.n_evaluated.tolist() == [36 + 630] * len(labels)
    assert float(lean.n_evaluated.float().mean()) < 0.6 * 666
    assert bool((lean.n_evaluated[certified] == 666).all())  # a certificate runs every pair
    # recovery rows never alert and carry no alert box
    assert bool((full.clean_output != ALERT).all()) and bool((full.alert_box == -1).all())
    assert bool((full.recovered_prediction == ALERT).all())
    assert torch.equal(full.vanilla_prediction, full.prediction)  # M is the unpruned model
    assert 0 < int(certified.sum()) < len(labels)


def test_certified_images_have_every_one_mask_prediction_right(cleanser_runs, test_images) -> None:
    full, _, masking = cleanser_runs
    _, labels = test_images
    certified = full.certified
    # the same windows and model: PatchCleanser's first round is the masking baseline's map
    assert torch.equal(full.mask_predictions, masking.mask_predictions)
    assert bool((masking.mask_predictions[certified] == labels[certified, None]).all())
    # the pairs matter: some images have every one-mask prediction right and still are not
    # certified (a pair fails, or a margin is too small)
    one_mask_right = (masking.mask_predictions == labels[:, None]).all(dim=1)
    assert bool((one_mask_right & ~certified).any())


@pytest.mark.slow
@pytest.mark.parametrize(("method", "checkpoint"), [("patchcleanser", MASKING_CHECKPOINT),
                                                    ("patchcleanser_challenger", MASKING_CHECKPOINT),
                                                    ("patchcleanser_sin", SCALECERT_CHECKPOINT)])
def test_a_certified_image_keeps_its_label_under_a_patch_anywhere(
        method, checkpoint, test_images) -> None:
    """The 3 x 3 family (14 px windows, 9 masks and 36 pairs) keeps the detections of the 784
    positions affordable: the rule and its proof do not depend on the family's size."""
    images, labels = test_images
    model = load_model("cifar_resnet20", checkpoint)
    certifier = Certifier(model, CertConfig(patch_px=PATCH, method=method, masks_per_axis=3),
                          full_map=False)
    result = certifier.certify(images, labels)
    chosen = result.certified.nonzero()[:, 0]
    assert len(chosen) > 0, f"{method}: none of {len(images)} images certified"
    image, label = images[chosen[0]], int(labels[chosen[0]])
    predictor = certifier.predictor
    logits_of = model if method != "patchcleanser_sin" else (lambda x: pruned_logits(predictor, x))
    variants = {"random": random_patches(image, PATCH, seed=0),
                "crafted": crafted_patches(logits_of, image, label, PATCH, seed=5)}
    fooled = 0
    for name, patched in variants.items():
        assert len(patched) == 784
        with torch.no_grad():
            fooled += int((logits_of(patched).argmax(dim=1) != label).sum())
        output = certifier.detect(patched).output
        wrong = (output != label).nonzero()[:, 0]
        assert len(wrong) == 0, f"{method}, {name} patch: output {output[wrong[:5]].tolist()} " \
                                f"at positions {wrong[:5].tolist()}"
    assert fooled > 0  # the crafted patches do fool the undefended prediction
