"""Certification and detection semantics on small models (no shared data needed)."""

from __future__ import annotations

import pytest
import torch
from support import randomize_batchnorm

from scalecert import ALERT, CertConfig, Certifier, create_model
from scalecert.methods.masking import OcclusionPredictor, box_masks
from scalecert.certify import NOT_EVALUATED
from scalecert.methods.detection import detect_outcome, evaluation_order
from scalecert.masks import MaskFamily
from scalecert.methods.base import EMPTY_BOX
from scalecert.methods.scalecert import SinPredictor
from scalecert.sin import keep_count, keep_positions, prune


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(12, 3, 8, 8, generator=generator), size=32,
                                             mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(12, 3, 32, 32, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def model(images) -> torch.nn.Module:
    """A random ResNet-20 whose classifier is standardised on the test images, so that its
    predictions differ between images and under masks (a plain random net predicts one class)."""
    torch.manual_seed(0)
    net = randomize_batchnorm(create_model("cifar_resnet20"), seed=0).eval()
    with torch.no_grad():
        pooled = images
        for name, stage in net.stages()[:-1]:  # everything before the classifier
            pooled = stage(pooled)
        mean, std = pooled.mean(dim=0), pooled.std(dim=0) + 1e-6
        weight = torch.randn(10, pooled.shape[1], generator=torch.Generator().manual_seed(3)) / std
        net.linear.weight.copy_(weight)
        net.linear.bias.copy_(-weight @ mean)
        assert len(set(net(images).argmax(dim=1).tolist())) >= 4
    return net


def all_mask_logits(predictor: SinPredictor, images: torch.Tensor, boxes: torch.Tensor):
    """F(x, m) for every image and every window, with no skipping."""
    batch = predictor.prepare(images)
    n, m = len(images), len(boxes)
    index = torch.arange(n).repeat_interleave(m)
    return batch, predictor.g(predictor.g_inputs(batch, index, boxes.repeat(n, 1))).view(n, m, -1)


def test_skipped_masks_give_what_computing_them_gives(model, images) -> None:
    predictor = SinPredictor(model, top_k=0.05)
    boxes = MaskFamily.build((32, 32), 2, masks_per_axis=8).boxes()
    batch, logits = all_mask_logits(predictor, images, boxes)
    needed = predictor.evaluation_priority(batch, boxes) > 0
    assert 0 < int((~needed).sum()) < needed.numel()  # some windows skipped, not all
    base = predictor.g(predictor.g_inputs(
        batch, torch.arange(len(images)), torch.tensor([EMPTY_BOX] * len(images))))
    k = keep_count(0.05, batch.features.shape[2:])
    feet = predictor.footprints(batch.features.shape[2:], boxes)
    for i, j in (~needed).nonzero().tolist():
        keep = keep_positions(batch.order[i:i + 1], feet[j:j + 1], k)
        assert torch.equal(keep, batch.keep[i:i + 1])
        assert torch.allclose(logits[i, j], base[i], atol=1e-5)
        assert int(logits[i, j].argmax()) == int(base[i].argmax())


@pytest.mark.parametrize("top_k", [0.05, 0.15, 0.9])
def test_g_inputs_are_the_pruned_features_by_definition(model, images, top_k) -> None:
    """g's inputs (read from a prefix of the selection order) equal A * 1[keep_m] with keep_m
    from the whole order, bit for bit: empty, small, large and whole-image boxes."""
    predictor = SinPredictor(model, top_k=top_k)
    batch = predictor.prepare(images)
    generator = torch.Generator().manual_seed(4)
    corners = torch.randint(0, 33, (40, 2, 2), generator=generator).sort(dim=1).values
    boxes = torch.cat([
        corners.transpose(1, 2).reshape(-1, 4)[:, [0, 2, 1, 3]],  # random (some empty)
        torch.tensor([EMPTY_BOX, (0, 0, 32, 32), (3, 4, 9, 11), (20, 0, 32, 5)]),
    ])
    index = torch.randint(0, len(images), (len(boxes),), generator=generator)
    feature_hw = batch.features.shape[2:]
    keep = keep_positions(batch.order[index], predictor.footprints(feature_hw, boxes),
                          keep_count(top_k, feature_hw))
    expected = prune(batch.features[index], keep)
    inputs = predictor.g_inputs(batch, index, boxes)
    assert inputs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(inputs, expected)
    assert torch.equal(predictor.g_inputs(batch, index[:0], boxes[:0]), expected[:0])


def test_stem_features_do_not_depend_on_batch_company(model, images) -> None:
    """An image's stem output outside a window's footprint is bit-for-bit the same when the
    window's pixels change, the image moves within its batch, and its batch-mates change."""
    predictor = SinPredictor(model, top_k=0.15, stem_batch=8)
    box = (10, 4, 19, 13)
    patched = images.clone()
    patched[:, :, 10:19, 4:13] = 1.0
    clean = predictor.stem_features(images[:5])[3]
    moved = predictor.stem_features(torch.cat([patched[6:11], patched[3:4]]))[5]
    alone = predictor.stem_features(patched[3:4])[0]
    outside = ~predictor.footprints((32, 32), torch.tensor([box]))[0].view(32, 32)
    assert torch.equal(clean[:, outside], moved[:, outside])
    assert torch.equal(clean[:, outside], alone[:, outside])
    assert not torch.equal(clean[:, ~outside], moved[:, ~outside])


def test_prediction_under_a_mask_ignores_the_pixels_inside_it(model, images) -> None:
    """F(x, m) = F(x', m) when x' differs from x only inside m: the selection and the head's
    input are bit-for-bit identical, whatever is written into the window."""
    predictor = SinPredictor(model, top_k=0.15)
    family = MaskFamily.build((32, 32), 5, masks_per_axis=6)
    generator = torch.Generator().manual_seed(2)
    k = keep_count(0.15, (32, 32))
    for index, (top, left, bottom, right) in enumerate(family.boxes().tolist()):
        patched = images.clone()
        patched[:, :, top:bottom, left:right] = torch.rand(
            len(images), 3, bottom - top, right - left, generator=generator) * (index % 3)
        patched.clamp_(0, 1)
        clean, dirty = predictor.prepare(images), predictor.prepare(patched)
        foot = predictor.footprints((32, 32), torch.tensor([[top, left, bottom, right]]))
        foot = foot.expand(len(images), -1)
        keep_clean = keep_positions(clean.order, foot, k)
        keep_dirty = keep_positions(dirty.order, foot, k)
        assert torch.equal(keep_clean, keep_dirty)
        mask = keep_clean.view(-1, 1, 32, 32).expand_as(clean.features)
        assert torch.equal(clean.features[mask], dirty.features[mask])


def test_results_are_deterministic_and_independent_of_batching(model, images) -> None:
    labels = torch.arange(len(images)) % 10
    config = CertConfig(patch_px=3, top_k=0.1, masks_per_axis=5)
    first = Certifier(model, config).certify(images, labels)
    again = Certifier(model, config).certify(images, labels)
    rebatched = Certifier(model, config, batch_size=7, image_chunk=5).certify(images, labels)
    for name in ("prediction", "certified", "mask_predictions", "n_evaluated", "clean_output",
                 "alert_box", "recovered_prediction", "vanilla_prediction"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert torch.equal(getattr(first, name), getattr(rebatched, name)), name
    assert torch.equal(first.min_margin, again.min_margin)
    assert torch.allclose(first.min_margin, rebatched.min_margin, atol=1e-4)


def test_certificate_fields_agree_with_the_definition(model, images) -> None:
    labels = torch.arange(len(images)) % 10
    certifier = Certifier(model, CertConfig(patch_px=4, top_k=0.2, masks_per_axis=4))
    result = certifier.certify(images, labels)
    # a model that predicts its own M(x) as the label makes certificates possible
    result_own = certifier.certify(images, result.prediction)
    assert bool(result_own.certified.any())
    for res, lab in ((result, labels), (result_own, result.prediction)):
        agrees = (res.prediction == lab) & (res.mask_predictions == lab[:, None]).all(dim=1)
        assert torch.equal(res.certified, agrees & (res.min_margin >= certifier.config.margin))
        assert bool((res.n_masks == 16).all()) and bool((res.n_evaluated <= 16).all())
        # certified images are never alerted on, clean
        assert bool((res.clean_output[res.certified] == lab[res.certified]).all())


def test_mask_predictions_follow_mask_boxes_order(model, images) -> None:
    certifier = Certifier(model, CertConfig(patch_px=5, top_k=1.0, masks_per_axis=3))
    result = certifier.detect(images[:4])
    predictor = SinPredictor(model, top_k=1.0)
    _, logits = all_mask_logits(predictor, images[:4], certifier.mask_boxes(32))
    assert torch.equal(result.mask_predictions, logits.argmax(dim=2))


def test_masking_baseline_is_direct_pixel_occlusion(model, images) -> None:
    config = CertConfig(patch_px=5, masks_per_axis=4, method="masking", occlusion_value=0.5)
    certifier = Certifier(model, config)
    labels = model(images).argmax(dim=1)
    result = certifier.certify(images, labels)
    assert bool((result.n_evaluated == 16).all())
    assert torch.equal(result.prediction, labels) and torch.equal(result.vanilla_prediction, labels)
    for m, (top, left, bottom, right) in enumerate(certifier.mask_boxes(32).tolist()):
        occluded = images.clone()
        occluded[:, :, top:bottom, left:right] = 0.5
        with torch.no_grad():
            assert torch.equal(result.mask_predictions[:, m], model(occluded).argmax(dim=1))


def test_masking_runs_every_window_centre_first(model, images) -> None:
    predictor = OcclusionPredictor(model)
    boxes = MaskFamily.build((32, 32), 5, masks_per_axis=5).boxes()  # odd grid: one centre
    priority = predictor.evaluation_priority(predictor.prepare(images[:2]), boxes)
    assert priority.shape == (2, 25) and bool((priority > 0).all())  # nothing skipped
    assert int(priority[0].argmax()) == 12  # the centre window
    grid = priority[0].view(5, 5)
    assert bool((grid[2, 2] > grid[1, 1]) & (grid[1, 1] > grid[0, 0]))  # falls off outwards
    assert int(priority[0].argmin()) in (0, 4, 20, 24)  # a corner last
    assert torch.equal(priority[0], priority[1])  # the same order for every image


def test_box_masks_cover_exactly_the_box() -> None:
    masks = box_masks(torch.tensor([[1, 2, 4, 3], [0, 0, 0, 0]]), (5, 6))
    assert masks.shape == (2, 1, 5, 6)
    assert masks[0, 0].nonzero().tolist() == [[1, 2], [2, 2], [3, 2]]
    assert not bool(masks[1].any())


def test_recovered_prediction_masks_the_located_block(model, images) -> None:
    certifier = Certifier(model, CertConfig(patch_px=3, top_k=0.3, masks_per_axis=6))
    result = certifier.detect(images)
    located = (result.alert_box[:, 0] >= 0).nonzero()[:, 0]
    assert len(located) > 0
    predictor = SinPredictor(model, top_k=0.3)
    batch = predictor.prepare(images[located])
    direct = predictor.g(predictor.g_inputs(batch, torch.arange(len(located)),
                                            result.alert_box[located]))
    assert torch.equal(result.recovered_prediction[located], direct.argmax(dim=1))
    assert bool((result.output[located] == ALERT).all())
    unlocated = result.alert_box[:, 0] < 0
    assert bool((result.recovered_prediction[unlocated] == ALERT).all())


# -- Algorithm 1 on hand-made prediction grids ----------------------------------------------


def grid_family(r: int) -> MaskFamily:
    return MaskFamily.build((12, 12), 2, r=r, mask_stride=3)  # 4 x 4 grid for r = 1


def test_all_agree_returns_the_prediction() -> None:
    family = grid_family(1)
    assert detect_outcome(3, torch.full((family.n_masks,), 3), family) == (3, None)


def test_one_disagreeing_mask_alerts_when_r_is_one() -> None:
    family = grid_family(1)
    predictions = torch.full((family.n_masks,), 3)
    predictions[5] = 7
    assert detect_outcome(3, predictions, family) == (ALERT, (1, 1))


def test_with_priorities_the_first_disagreeing_window_in_that_order_is_located() -> None:
    family = grid_family(1)
    predictions = torch.full((family.n_masks,), 3)
    predictions[[2, 9, 14]] = 7
    priority = torch.ones(family.n_masks)
    priority[[9, 14]] = 2.0  # 9 and 14 run before 2; ties keep family order: 9 first
    assert detect_outcome(3, predictions, family, priority) == (ALERT, (2, 1))
    predictions[9] = NOT_EVALUATED  # left unrun: never located
    assert detect_outcome(3, predictions, family, priority) == (ALERT, (3, 2))
    assert detect_outcome(3, predictions, family) == (ALERT, (0, 2))  # no priorities: row-major


def test_evaluation_order_of_a_matrix_is_each_rows_own_order() -> None:
    generator = torch.Generator().manual_seed(5)
    priority = torch.randint(0, 4, (20, 16), generator=generator).float()  # many ties
    order = evaluation_order(priority)
    for row, row_order in zip(priority, order):
        assert torch.equal(row_order, evaluation_order(row))
    family = grid_family(1)
    predictions = torch.full((family.n_masks,), 3)
    predictions[[2, 9, 14]] = 7
    for row, row_order in zip(priority, order):
        assert (detect_outcome(3, predictions, family, row, row_order)
                == detect_outcome(3, predictions, family, row))


def test_block_rule_needs_a_whole_r_by_r_block_of_one_class() -> None:
    family = grid_family(2)
    rows, cols = family.grid_shape
    grid = torch.full((rows, cols), 3)
    grid[1:3, 1:3] = 7
    assert detect_outcome(3, grid.flatten(), family) == (ALERT, (1, 1))
    grid[2, 2] = 8  # the block no longer agrees: a minority of disagreement is ignored
    assert detect_outcome(3, grid.flatten(), family) == (3, None)


def test_majority_rule_alerts_without_a_block() -> None:
    family = grid_family(2)
    rows, cols = family.grid_shape
    grid = (torch.arange(rows)[:, None] + torch.arange(cols)[None]) % 2 + 5  # checkerboard 5/6
    grid[0, 0] = 3
    assert detect_outcome(3, grid.flatten(), family) == (ALERT, None)


# -- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "message"), [
    (torch.rand(2, 1, 32, 32), "images"),
    (torch.rand(3, 32, 32), "images"),
    (torch.rand(2, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.full((2, 3, 32, 32), float("nan")), r"\[0, 1\]"),
    (torch.randint(0, 255, (2, 3, 32, 32)), "floats"),
    (torch.rand(2, 3, 4, 4), "patch_px"),
])
def test_bad_images_are_refused(model, bad, message) -> None:
    certifier = Certifier(model, CertConfig(patch_px=5))
    with pytest.raises(ValueError, match=message):
        certifier.certify(bad, torch.zeros(len(bad), dtype=torch.int64))


@pytest.mark.parametrize("labels", [
    torch.tensor([0, 1, 2]), torch.tensor([0, 10]), torch.tensor([0.0, 1.0]), torch.tensor([-1, 0]),
])
def test_bad_labels_are_refused(model, labels) -> None:
    with pytest.raises(ValueError, match="labels"):
        Certifier(model, CertConfig(patch_px=5)).certify(torch.rand(2, 3, 32, 32), labels)


@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_unknown_layer_is_refused(model, method) -> None:
    with pytest.raises(ValueError, match="layer"):
        Certifier(model, CertConfig(patch_px=5, layer="layer9", method=method))


def test_prepared_stem_features_are_shared_across_patch_sizes(model, images) -> None:
    labels = torch.arange(len(images)) % 10
    small = Certifier(model, CertConfig(patch_px=2, top_k=0.2), image_chunk=5)
    large = Certifier(model, CertConfig(patch_px=5, top_k=0.2), image_chunk=5)
    assert small.preparation_key == large.preparation_key
    assert small.preparation_key != Certifier(model, CertConfig(patch_px=2, top_k=0.3)).preparation_key
    prepared = small.prepare(images)
    for certifier in (small, large):
        shared = certifier.certify(images, labels, prepared=prepared)
        alone = certifier.certify(images, labels)
        assert torch.equal(shared.mask_predictions, alone.mask_predictions)
        assert torch.equal(shared.certified, alone.certified)
    with pytest.raises(ValueError, match="prepared"):
        large.certify(images[:3], labels[:3], prepared=prepared)


@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_shared_preparation_runs_the_unmasked_model_once(model, images, method) -> None:
    """M(x) (and scalecert's vanilla forward) do not depend on the patch size: certifiers that
    share a prepared batch run them once, with the same results as alone."""
    labels = torch.arange(len(images)) % 10
    per_axis = 6 if method == "scalecert" else 12
    configs = [CertConfig(patch_px=px, top_k=0.2, masks_per_axis=per_axis, method=method)
               for px in (2, 5)]
    alone = [Certifier(model, config, image_chunk=5, full_map=full)
             for config, full in zip(configs, (True, False))]
    shared = [Certifier(model, config, image_chunk=5, full_map=full)
              for config, full in zip(configs, (True, False))]
    prepared = shared[0].prepare(images)
    for lone, sharer in zip(alone, shared):
        expected = lone.certify(images, labels)
        result = sharer.certify(images, labels, prepared=prepared)
        for name in ("prediction", "vanilla_prediction", "certified", "min_margin",
                     "clean_output", "mask_predictions", "recovered_prediction"):
            assert torch.equal(getattr(expected, name), getattr(result, name)), name
    unmasked_runs = len(images) * (2 if method == "scalecert" else 1)  # M(x) (+ vanilla)
    assert shared[0].runner.pairs == alone[0].runner.pairs
    assert shared[1].runner.pairs == alone[1].runner.pairs - unmasked_runs
    # other labels are another memo entry: M(x)'s margins depend on them
    again = shared[1].certify(images, (labels + 1) % 10, prepared=prepared)
    assert torch.equal(again.prediction, result.prediction)
    assert not torch.equal(again.min_margin, result.min_margin)


@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_work_avoidance_leaves_every_outcome_unchanged(model, images, method) -> None:
    per_axis = 6 if method == "scalecert" else 12  # the random net is fragile under occlusion
    config = CertConfig(patch_px=2, top_k=0.3, masks_per_axis=per_axis, method=method)
    labels = Certifier(model, config).detect(images).prediction  # M(x) as the label ...
    labels[::4] = (labels[::4] + 1) % 10  # ... but wrong for some images
    full = Certifier(model, config).certify(images, labels)
    lean = Certifier(model, config, full_map=False, batch_size=16).certify(images, labels)
    for name in ("prediction", "vanilla_prediction", "certified", "clean_output", "alert_box",
                 "recovered_prediction"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    assert bool((lean.n_evaluated <= full.n_evaluated).all())
    assert int(lean.n_evaluated.sum()) < int(full.n_evaluated.sum())
    assert bool(full.certified.any()) and bool((full.clean_output == ALERT).any())
    certified = full.certified
    assert torch.equal(lean.mask_predictions[certified], full.mask_predictions[certified])
    assert torch.equal(lean.n_evaluated[certified], full.n_evaluated[certified])
    run = lean.mask_predictions != NOT_EVALUATED
    assert torch.equal(lean.mask_predictions[run], full.mask_predictions[run])
    assert torch.equal((lean.mask_predictions == NOT_EVALUATED).sum(dim=1),
                       full.n_evaluated - lean.n_evaluated)
    boxes = Certifier(model, config).mask_boxes(32).tolist()
    for i in (lean.clean_output == ALERT).nonzero()[:, 0].tolist():  # r = 1: a located window
        window = boxes.index(lean.alert_box[i].tolist())
        assert int(full.mask_predictions[i, window]) != int(full.prediction[i])
    detected = Certifier(model, config, full_map=False).detect(images)
    assert torch.equal(detected.output, full.clean_output)


def test_work_avoidance_needs_every_window_when_r_exceeds_one(model, images) -> None:
    labels = model(images).argmax(dim=1)
    config = CertConfig(patch_px=3, top_k=0.15, masks_per_axis=6, r=2)
    full = Certifier(model, config).certify(images, labels)
    lean = Certifier(model, config, full_map=False).certify(images, labels)
    assert torch.equal(full.mask_predictions, lean.mask_predictions)
    assert torch.equal(full.n_evaluated, lean.n_evaluated)
