"""CertifierGroup / certify_many on real data: the same certificates as one Certifier per
setting, with the stem run and the images checked once per shared preparation.

Shared ResNet-20 weights (akamaster) and CIFAR-10 test JPEGs (3 per class).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.methods.masking import OcclusionPredictor
from scalecert.certify import CertifierGroup, CertifyResult, certify_many
from scalecert.errors import InvalidOption
from scalecert.methods.scalecert import SinPredictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_images(cifar10_test_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_test_dir, per_class=3)


@pytest.fixture(scope="module")
def resnet20(resnet20_checkpoint: Path) -> torch.nn.Module:
    return load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)


def settings(method: str) -> list[CertConfig]:
    """Three patch sizes, and (scalecert) a top-k that needs a preparation of its own."""
    configs = [CertConfig(patch_px=px, masks_per_axis=6, method=method) for px in (3, 5, 8)]
    if method == "scalecert":
        configs.append(CertConfig(patch_px=5, top_k=0.3, masks_per_axis=6, method=method))
    return configs


def assert_same_result(expected: CertifyResult, result: CertifyResult) -> None:
    for field in fields(CertifyResult):
        want, got = getattr(expected, field.name), getattr(result, field.name)
        assert want.dtype == got.dtype and torch.equal(want, got), field.name


def count_preparations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of images of every predictor preparation (scalecert's stem and SIN
    selection, masking's pixels)."""
    prepared: list[int] = []
    for predictor in (SinPredictor, OcclusionPredictor):
        original = predictor.prepare

        def counted(self, images, original=original):
            prepared.append(len(images))
            return original(self, images)

        monkeypatch.setattr(predictor, "prepare", counted)
    return prepared


@pytest.mark.parametrize(("method", "full_map"),
                         [("scalecert", True), ("scalecert", False), ("masking", False)])
def test_group_gives_each_settings_own_certificates(
    cifar_images, resnet20, method, full_map, monkeypatch
) -> None:
    images, labels = cifar_images
    configs = settings(method)
    alone = [Certifier(resnet20, config, full_map=full_map).certify(images, labels)
             for config in configs]

    prepared = count_preparations(monkeypatch)
    outcomes = CertifierGroup(resnet20, configs, full_map=full_map).certify(images, labels)
    assert [outcome.config for outcome in outcomes] == configs
    for expected, outcome in zip(alone, outcomes):
        assert_same_result(expected, outcome.result)
        assert outcome.seconds >= 0
    keys = {Certifier(resnet20, config).preparation_key for config in configs}
    assert len(keys) == (2 if method == "scalecert" else 1)
    assert prepared == [len(images)] * len(keys)  # the stem once per preparation key

    prepared.clear()
    many = certify_many(resnet20, images, labels, configs, full_map=full_map)
    for expected, result in zip(alone, many):
        assert_same_result(expected, result)
    assert prepared == [len(images)] * len(keys)
    # informative: alerts, located ones among them, and settings that differ
    assert bool((alone[0].clean_output == ALERT).any())
    assert bool((alone[0].alert_box[:, 0] >= 0).any())
    assert not torch.equal(alone[0].n_evaluated, alone[-1].n_evaluated)


def test_group_shares_the_stem_between_chunks_too(cifar_images, resnet20, monkeypatch) -> None:
    """With image chunks smaller than the batch, every image still meets the stem once per
    preparation key (the chunks of one preparation are shared)."""
    images, labels = cifar_images
    configs = settings("scalecert")[:2]
    options = dict(image_chunk=16, full_map=False)
    alone = [Certifier(resnet20, config, **options).certify(images, labels) for config in configs]
    stem_images: list[int] = []
    original = SinPredictor.stem_features
    monkeypatch.setattr(SinPredictor, "stem_features",
                        lambda self, batch: stem_images.append(len(batch)) or original(self, batch))
    results = certify_many(resnet20, images, labels, configs, **options)
    for expected, result in zip(alone, results):
        assert_same_result(expected, result)
    assert sum(stem_images) == len(images)


BAD_IMAGES = [
    (lambda images: images * 2, r"images: values must lie in \[0, 1\]"),
    (lambda images: images.masked_fill(images > 0.5, float("nan")), r"images: values must lie"),
    (lambda images: (images * 255).to(torch.uint8), "images: expected floats"),
    (lambda images: images[:, :1], "images: expected shape"),
    (lambda images: images[0], "images: expected shape"),
    (lambda images: images[:0], "images: the batch is empty"),
    (lambda images: images.numpy(), "images: expected a torch.Tensor"),
]


@pytest.mark.parametrize(("spoil", "message"), BAD_IMAGES)
def test_bad_images_are_refused_by_every_entry_point(
    cifar_images, resnet20, spoil, message, monkeypatch
) -> None:
    images, labels = cifar_images
    bad = spoil(images[:4])
    labels = labels[:4]
    configs = settings("scalecert")[:2]
    prepared = count_preparations(monkeypatch)
    certifier = Certifier(resnet20, configs[0])
    calls = [
        lambda: certifier.certify(bad, labels),
        lambda: certifier.detect(bad),
        lambda: certifier.prepare(bad),
        lambda: CertifierGroup(resnet20, configs).certify(bad, labels),
        lambda: certify_many(resnet20, bad, labels, configs),
    ]
    for call in calls:
        with pytest.raises(InvalidOption, match=message):
            call()
    assert prepared == []  # refused before any work


def test_a_setting_whose_patch_does_not_fit_is_refused_before_any_work(
    cifar_images, resnet20, monkeypatch
) -> None:
    images, labels = cifar_images
    configs = [CertConfig(patch_px=5), CertConfig(patch_px=40)]
    prepared = count_preparations(monkeypatch)
    with pytest.raises(InvalidOption, match="patch_px: a 40 px patch is larger than the images"):
        CertifierGroup(resnet20, configs).certify(images[:4], labels[:4])
    with pytest.raises(InvalidOption, match="labels"):
        certify_many(resnet20, images[:4], labels[:3], configs[:1])
    assert prepared == []


def test_group_refuses_a_setting_that_cannot_run_before_any_work(
    cifar_images, resnet20, monkeypatch
) -> None:
    """A patch too large for the images in the last setting, or a bad label, is refused
    before the first setting prepares anything."""
    images, labels = cifar_images
    prepared = count_preparations(monkeypatch)
    too_large = [CertConfig(patch_px=5), CertConfig(patch_px=40, method="masking")]
    with pytest.raises(InvalidOption, match="patch_px: a 40 px patch is larger"):
        CertifierGroup(resnet20, too_large).certify(images, labels)
    bad_labels = labels.clone()
    bad_labels[-1] = 10
    with pytest.raises(InvalidOption, match=r"labels: values must lie in \[0, 10\)"):
        CertifierGroup(resnet20, [CertConfig(patch_px=5)]).certify(images, bad_labels)
    assert prepared == []
