"""The alert-confidence rule (``CertConfig(alert_confidence=TAU)``): detection alerts only on a
window that disagrees with M(z) at softmax confidence >= TAU, a certificate needs every window
at >= TAU + margin / 2. On real CIFAR-10 JPEGs with the committed ScaleCert checkpoint: the rows
of one run without TAU give every TAU's outcomes, work avoidance keeps them, and a certified
image patched anywhere (random and crafted patches) ends in its label or ALERT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support import assert_scalecert_detection_is_sound

from pipeline.cli import main
from pipeline.compute.batches import load_image_folder
from scalecert import ALERT, CertConfig, Certifier, load_model
from scalecert.errors import InvalidOption
from scalecert.precision import FastPath, close_calls

PATCH = 5
CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet20-scalecert-2.4.pt"
TAUS = (0.3, 0.6, 0.9)


@pytest.mark.parametrize(("options", "message"), [
    ({"alert_confidence": 0.0}, "alert_confidence: must be a number in \\(0, 1\\), got 0.0"),
    ({"alert_confidence": 1.0}, "alert_confidence: must be a number in \\(0, 1\\)"),
    ({"alert_confidence": float("nan")}, "alert_confidence: must be a number"),
    ({"alert_confidence": True}, "alert_confidence: must be a number"),
    ({"alert_confidence": 0.5, "r": 2}, "alert_confidence: needs r = 1, got r = 2"),
    ({"alert_confidence": 0.5, "method": "patchcleanser"},
     "alert_confidence: method patchcleanser never alerts"),
])
def test_bad_alert_confidences_are_refused(options, message) -> None:
    with pytest.raises(InvalidOption, match=message):
        CertConfig(patch_px=PATCH, **options)


@pytest.mark.parametrize(("flags", "message"), [
    (["--alert-confidence", "1.5"], "--alert-confidence: must be a number in (0, 1), got 1.5"),
    (["--alert-confidence", "0.5", "--method", "patchcleanser"],
     "--alert-confidence: method patchcleanser never alerts"),
])
def test_cli_refuses_bad_alert_confidences_before_any_work(tmp_path, flags, message) -> None:
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, ["certify", "--data", str(tmp_path / "absent"), "--model",
                                        "cifar_resnet20", "--patch", "5", "--out", str(out),
                                        *flags])
    assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not out.exists()


def test_confidences_near_a_threshold_are_close_calls() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    top = torch.softmax(logits, dim=1).amax(dim=1)
    assert not bool(close_calls(logits, None, 1e-3, 1e-2).any())
    close = close_calls(logits, None, 1e-3, 1e-2, confidence_levels=(float(top[0]) + 1e-3,))
    assert close.tolist() == [True, False]


@pytest.fixture(scope="module")
def runs(cifar10_test_dir):
    """Full-map runs without TAU and with each TAU, and work-avoidance runs with each TAU."""
    torch.set_num_threads(2)
    images, labels = load_image_folder(cifar10_test_dir, per_class=3)
    model = load_model("cifar_resnet20", CHECKPOINT)
    results = {}
    for tau in (None, *TAUS):
        config = CertConfig(patch_px=PATCH, alert_confidence=tau)
        results[tau, True] = Certifier(model, config, full_map=True).certify(images, labels)
        if tau is not None:
            results[tau, False] = Certifier(model, config, full_map=False).certify(images, labels)
    return images, labels, results


def test_one_run_without_tau_gives_every_taus_outcomes(runs) -> None:
    _, _, results = runs
    plain = results[None, True]
    assert bool((plain.min_confidence > 0).all()) and bool((plain.min_confidence <= 1).all())
    alerts = []
    for tau in TAUS:
        at_tau = results[tau, True]
        slack = tau + 1e-3 / 2
        assert torch.equal(at_tau.certified, plain.certified & (plain.min_confidence >= slack))
        expected = torch.where(plain.max_alert_confidence >= tau, ALERT, plain.prediction)
        assert torch.equal(at_tau.clean_output, expected), tau
        alerts.append(int((at_tau.clean_output == ALERT).sum()))
    # without TAU every disagreeing window alerts: the most alerts; more TAU, fewer alerts
    assert int((plain.clean_output == ALERT).sum()) >= alerts[0] >= alerts[1] >= alerts[2]
    assert alerts[0] > alerts[2]


def test_work_avoidance_keeps_the_outcomes_at_every_tau(runs) -> None:
    _, _, results = runs
    for tau in TAUS:
        full, lean = results[tau, True], results[tau, False]
        for name in ("certified", "clean_output", "alert_box", "recovered_prediction"):
            assert torch.equal(getattr(full, name), getattr(lean, name)), (tau, name)
        assert int(lean.n_evaluated.sum()) <= int(full.n_evaluated.sum())


@pytest.mark.slow
def test_bf16_takes_the_fp32_decisions_at_tau(runs) -> None:
    """Confidences near TAU or TAU + margin / 2 are close calls, re-run in eager fp32."""
    images, labels, results = runs
    config = CertConfig(patch_px=PATCH, alert_confidence=0.6)
    fast = Certifier(load_model("cifar_resnet20", CHECKPOINT), config, full_map=True,
                     fast=FastPath("bf16"))
    result = fast.certify(images, labels)
    reference = results[0.6, True]
    for name in ("certified", "clean_output", "alert_box", "mask_predictions"):
        assert torch.equal(getattr(result, name), getattr(reference, name)), name


@pytest.mark.slow
def test_a_certified_image_is_never_misclassified_at_tau(runs) -> None:
    images, labels, results = runs
    tau = 0.6
    model = load_model("cifar_resnet20", CHECKPOINT)
    certifier = Certifier(model, CertConfig(patch_px=PATCH, alert_confidence=tau),
                          full_map=False)
    chosen = results[tau, True].certified.nonzero()[:, 0]
    assert len(chosen) > 0
    image, label = images[chosen[0]], int(labels[chosen[0]])
    assert_scalecert_detection_is_sound(certifier, image, label, PATCH, seed=1)
