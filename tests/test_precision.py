"""The fast path of g (bf16 autocast with an fp32 re-check of close calls, torch.compile with a
fallback) takes the fp32 path's decisions; its options are validated and resolved per device.

CPU only. Real-data tests: the committed fine-tuned ResNet-20 checkpoints on 30 CIFAR-10 test
JPEGs (3 per class), 2.4% patches (5 px), 6 x 6 masks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline import cli
from pipeline.certify.worker import CertifyWorker
from pipeline.compute.batches import load_image_folder
from pipeline.run.config import RunConfig
from pipeline.run.worker import WorkerSettings
from scalecert import CertConfig, Certifier, load_model
from scalecert.precision import DEFAULT_TOLERANCE, FP32_TOLERANCE, FastPath, GRunner

MODELS = Path(__file__).resolve().parents[1] / "models"
OUTCOMES = ("prediction", "vanilla_prediction", "certified", "clean_output", "alert_box",
            "recovered_prediction", "mask_predictions", "n_evaluated")
UNCHECKED_IMAGES = 10
BASE = {"data": "images/", "model": "cifar_resnet20", "out": "runs/x", "patches": ("2.4%",)}


@pytest.fixture(scope="module")
def cifar_images(cifar10_test_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_test_dir, per_class=3)


@pytest.fixture(scope="module")
def fp32_reference(cifar_images):
    """The eager fp32 certificates of ``cifar_images`` by (method, full_map), each computed once
    for the module: what every fast path must reproduce."""
    cache: dict[tuple[str, bool], object] = {}

    def reference(method: str, full_map: bool):
        if (method, full_map) not in cache:
            config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6, method=method)
            certifier = Certifier(committed_model(method), config, full_map=full_map)
            cache[method, full_map] = certifier.certify(*cifar_images)
        return cache[method, full_map]

    return reference


def committed_model(method: str) -> nn.Module:
    return load_model("cifar_resnet20", checkpoint=MODELS / f"cifar10-resnet20-{method}-2.4.pt")


def assert_same_outcomes(reference, result) -> None:
    for name in OUTCOMES:
        assert torch.equal(getattr(reference, name), getattr(result, name)), name


# -- bf16 on real data ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("full_map", [True, False])
@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_bf16_takes_the_fp32_decisions_on_cifar10(cifar_images, fp32_reference, method,
                                                 full_map) -> None:
    images, labels = cifar_images
    model = committed_model(method)
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6, method=method)
    reference = fp32_reference(method, full_map)
    fast = Certifier(model, config, full_map=full_map, fast=FastPath("bf16"))
    result = fast.certify(images, labels)

    assert 0 < int(reference.certified.sum()) < len(images)  # both outcomes occur
    assert_same_outcomes(reference, result)
    assert 0 < fast.runner.rechecked < fast.runner.pairs
    assert fast.runner.max_recheck_error < DEFAULT_TOLERANCE

    # without the re-check g really ran in bf16: margins move, and nothing was re-run (a few
    # images show it)
    unchecked = Certifier(model, config, full_map=full_map, fast=FastPath("bf16", tolerance=0))
    loose = unchecked.certify(images[:UNCHECKED_IMAGES], labels[:UNCHECKED_IMAGES])
    assert unchecked.runner.rechecked == 0
    assert not torch.equal(loose.min_margin, reference.min_margin[:UNCHECKED_IMAGES])


def adversarial_autocast(g: nn.Module, shift: float) -> nn.Module:
    """g whose output under autocast is the fp32 logits with the runner-up raised by ``shift``:
    every pair with a top-1 gap below ``shift`` flips its prediction (a near-tie bf16 lost)."""

    class Shifted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            low_precision = torch.is_autocast_enabled("cpu")
            with torch.autocast("cpu", enabled=False):
                logits = g(x).float()
            if low_precision:
                second = logits.topk(2, dim=1).indices[:, 1]
                logits = logits + shift * nn.functional.one_hot(second, logits.shape[1])
            return logits

    return Shifted()


@pytest.mark.slow
def test_the_recheck_decides_the_close_calls(cifar_images, fp32_reference) -> None:
    images, labels = cifar_images
    model = committed_model("scalecert")
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6)
    reference = fp32_reference("scalecert", True)

    def run(tolerance: float):
        certifier = Certifier(model, config, fast=FastPath("bf16", tolerance=tolerance))
        certifier.runner.g = adversarial_autocast(certifier.runner.g, shift=0.3)
        return certifier.certify(images, labels)

    assert_same_outcomes(reference, run(tolerance=0.7))  # tolerance > 2 x shift: exact
    flipped = run(tolerance=0.0)  # the same g without the re-check takes other decisions
    assert not torch.equal(reference.mask_predictions, flipped.mask_predictions)


def test_runner_rechecks_argmax_and_margin_near_ties() -> None:
    class NearTie(nn.Module):  # fp32: class 1 by 0.05; bf16: class 0 by 0.05
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            row = [1.05, 1.0, 0.0] if torch.is_autocast_enabled("cpu") else [1.0, 1.05, 0.0]
            return torch.tensor([row]).repeat(len(x), 1)

    inputs = torch.zeros(3, 4)
    exact = GRunner(NearTie(), FastPath("bf16", tolerance=0.1), 1e-3, "cpu", batch_size=2)
    assert exact(inputs).argmax(dim=1).tolist() == [1, 1, 1]
    assert (exact.pairs, exact.rechecked) == (3, 3)
    loose = GRunner(NearTie(), FastPath("bf16", tolerance=0.0), 1e-3, "cpu", batch_size=2)
    assert loose(inputs).argmax(dim=1).tolist() == [0, 0, 0]

    class MarginEdge(nn.Module):  # margin 2 for label 0: met in fp32, missed under autocast
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lead = 1.998 if torch.is_autocast_enabled("cpu") else 2.002
            return torch.tensor([[5.0 + lead, 5.0, 0.0]]).repeat(len(x), 1)

    # the top-1 gap (2) is no close call at tolerance 0.01: only the margin test catches these
    runner = GRunner(MarginEdge(), FastPath("bf16", tolerance=0.01), 2.0, "cpu", batch_size=4)
    logits = runner(torch.zeros(2, 4), torch.tensor([0, 0]))
    assert bool(((logits[:, 0] - logits[:, 1]) >= 2.0).all())
    assert runner.rechecked == 2


def test_runner_warns_when_the_error_reaches_the_tolerance() -> None:
    class Lead(nn.Module):  # class 0 leads by 0.3
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[0.3, 0.0, 0.0]]).repeat(len(x), 1)

    # under autocast the runner-up gains 0.5: a gap of 0.2, a close call at tolerance 0.25,
    # re-checked, and an error of 0.5 that the tolerance does not cover
    g = adversarial_autocast(Lead(), shift=0.5)
    runner = GRunner(g, FastPath("bf16", tolerance=0.25), 1e-3, "cpu", batch_size=8)
    with pytest.warns(RuntimeWarning, match="^tolerance: .* by 0.5"):
        logits = runner(torch.zeros(8, 4))
    assert logits.argmax(dim=1).tolist() == [0] * 8
    assert runner.rechecked == 8 and runner.max_recheck_error == 0.5


# -- compile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["compiling", "first call"])
def test_compile_failure_warns_once_and_runs_eager(monkeypatch, cifar_images, where) -> None:
    images, labels = cifar_images[0][:20], cifar_images[1][:20]
    model = committed_model("scalecert")
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6)
    reference = Certifier(model, config, batch_size=64).certify(images, labels)

    def broken_compile(g, **options):
        if where == "compiling":
            raise RuntimeError("no compiler here")

        def call(x):
            raise RuntimeError("inductor exploded")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    certifier = Certifier(model, config, batch_size=64, fast=FastPath("fp32", compile=True))
    with pytest.warns(RuntimeWarning, match="compile: .*(no compiler here|inductor exploded)") \
            as caught:
        result = certifier.certify(images, labels)
    assert len([w for w in caught if str(w.message).startswith("compile:")]) == 1
    assert not certifier.runner.compiled
    assert_same_outcomes(reference, result)


@pytest.mark.slow
def test_compiled_bf16_on_cpu_takes_the_fp32_decisions(cifar_images) -> None:
    images, labels = cifar_images[0][:10], cifar_images[1][:10]
    model = committed_model("scalecert")
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6)
    reference = Certifier(model, config, batch_size=128).certify(images, labels)
    certifier = Certifier(model, config, batch_size=128, fast=FastPath("bf16", compile=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = certifier.certify(images, labels)
    if not certifier.runner.compiled:
        reasons = [str(w.message) for w in caught if str(w.message).startswith("compile:")]
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {reasons}")
    assert_same_outcomes(reference, result)
    assert certifier.runner.rechecked > 0


# -- folded BatchNorm -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_folded_batchnorm_takes_the_fp32_decisions_on_cifar10(cifar_images, fp32_reference,
                                                            method) -> None:
    images, labels = cifar_images
    model = committed_model(method)
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6, method=method)
    reference = fp32_reference(method, False)
    folded = Certifier(model, config, full_map=False, fast=FastPath(fuse_bn=True))
    result = folded.certify(images, labels)

    assert_same_outcomes(reference, result)
    g = folded.runner.g_fast
    assert g is not folded.runner.g
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.modules())  # every BN was folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.runner.g.modules())  # a copy
    assert folded.runner.max_recheck_error < FP32_TOLERANCE
    assert not torch.equal(result.min_margin, reference.min_margin)  # g really changed


def test_untraceable_g_runs_unfolded_with_a_warning() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.bn(self.conv(x)).flatten(1)

    g = Untraceable().eval()
    with pytest.warns(RuntimeWarning, match="fuse_bn: cannot trace g"):
        runner = GRunner(g, FastPath(fuse_bn=True), margin=0.0, device="cpu", batch_size=4)
    assert runner.g_fast is g


def test_default_tolerance_follows_the_precision() -> None:
    assert FastPath("bf16").tolerance == DEFAULT_TOLERANCE
    assert FastPath("fp32", fuse_bn=True).tolerance == FP32_TOLERANCE
    assert FastPath("bf16", tolerance=0.5).tolerance == 0.5


# -- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "field"), [
    ({"precision": "fp16"}, "precision"),
    ({"compile": "yes"}, "compile"),
    ({"fuse_bn": "yes"}, "fuse_bn"),
    ({"tolerance": -0.1}, "tolerance"),
    ({"tolerance": float("nan")}, "tolerance"),
])
def test_fast_path_refuses_bad_values(change, field) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        FastPath(**change)


@pytest.mark.parametrize(("change", "flag"), [
    ({"precision": "fp16"}, "--precision"),
    ({"precision": None}, "--precision"),
    ({"compile": "yes"}, "--compile"),
    ({"compile": 1}, "--compile"),
    ({"fuse_bn": "on"}, "--fuse-bn"),
])
def test_run_config_refuses_bad_fast_path_options(change, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        RunConfig(**{**BASE, **change})


@pytest.mark.parametrize(("options", "device", "expected"), [
    ({}, "cpu", FastPath("fp32", compile=False, fuse_bn=True)),
    ({}, "cuda", FastPath("bf16", compile=True, fuse_bn=True)),
    ({}, "cuda:1", FastPath("bf16", compile=True, fuse_bn=True)),
    ({"precision": "bf16"}, "cpu", FastPath("bf16", compile=False, fuse_bn=True)),
    ({"precision": "fp32", "compile": False, "fuse_bn": False}, "cuda", FastPath("fp32")),
    ({"compile": True, "fuse_bn": False}, "cpu", FastPath("fp32", compile=True)),
])
def test_auto_resolves_per_device(options, device, expected) -> None:
    assert RunConfig(**{**BASE, **options}).fast_path(device) == expected


def test_fast_path_options_leave_the_fingerprint_alone() -> None:
    fast = RunConfig(**BASE, precision="bf16", compile=True, fuse_bn=False)
    assert fast.fingerprint_fields() == RunConfig(**BASE).fingerprint_fields()


def test_cli_flags_reach_the_run_config(monkeypatch, tmp_path) -> None:
    runs = []
    monkeypatch.setattr(cli, "_run_and_report", lambda run, quiet: runs.append(run))
    args = ["certify", "--data", str(tmp_path), "--model", "cifar_resnet20", "--patch", "5",
            "--out", str(tmp_path / "out")]
    for extra in (["--precision", "bf16", "--no-compile", "--no-fuse-bn"], []):
        assert CliRunner().invoke(cli.main, [*args, *extra]).exit_code == 0
    assert [(run.precision, run.compile, run.fuse_bn) for run in runs] == [
        ("bf16", False, False), ("auto", "auto", "auto")]

    bad = CliRunner().invoke(cli.main, [*args, "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision" in bad.output
    config = tmp_path / "run.yaml"
    config.write_text("compile: maybe\n")
    bad = CliRunner().invoke(cli.main, [*args, "--config", str(config)])
    assert bad.exit_code == 2 and "--compile" in bad.output


def test_worker_certifies_with_the_resolved_fast_path(tmp_path) -> None:
    run = RunConfig(**{**BASE, "out": str(tmp_path / "out")}, device="cpu", precision="bf16",
                    methods=("scalecert", "masking"),
                    checkpoint=str(MODELS / "cifar10-resnet20-scalecert-2.4.pt"))
    worker = CertifyWorker(WorkerSettings(run=run, run_id="test", metadata={}, patch_pixels=(5,),
                                        image_side=32, checkpoint_sha256=None))
    assert [certifier.fast for certifier in worker.certifiers.certifiers] == [
        FastPath("bf16", fuse_bn=True)] * 2
    images = torch.rand(2, 3, 32, 32)
    assert worker._to_device(images) is images  # CPU: no pinning, no copy
