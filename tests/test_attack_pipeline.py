"""``scalecert attack`` without Ray: bad options refused before any work; the audit catches a
planted unsound certifier (a test double that certifies everything) and exits non-zero; a
universal patch is trained once and reused on resume. The shards run in this process through
the real attack worker (``execute`` replaced by a serial loop); the Ray path is pinned in
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from support import copy_class_subset

import pipeline.run.driver as driver
from pipeline.attack.worker import AttackWorker
from pipeline.cli import EXIT_AUDIT_FAILED, main
from scalecert.certify import CertifierGroup

REPO = Path(__file__).resolve().parents[1]
MASKING = REPO / "models" / "cifar10-resnet20-masking-2.4.pt"


def attack(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["attack", "--quiet", *args])  # output: with stderr
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    return result.exit_code, result.output + (repr(result.exception) if crashed else "")


@pytest.fixture
def serial_shards(monkeypatch):
    """The driver's Ray pool replaced by a loop over the shards in this process, with the
    real attack worker; returns the workers it made."""
    made: list[AttackWorker] = []

    def execute(plan, todo, on_shard=None, max_attempts=3, worker=None):
        worker_class, worker_args = worker
        instance = worker_class(plan.worker_settings(threads=2), *worker_args)
        made.append(instance)
        for shard in todo:
            summary = instance.run(plan.task(shard))
            if on_shard is not None:
                on_shard(summary)

    monkeypatch.setattr(driver, "execute", execute)
    monkeypatch.setattr(driver, "init_ray", lambda address: False)
    return made


def rows_of(out: Path) -> list[dict]:
    return [row for part in sorted((out / "attacks").glob("part-*.parquet"))
            for row in pq.read_table(part).to_pylist()]


@pytest.mark.parametrize(("flags", "message"), [
    (["--attack", "universal"], "--universal-data: expected a labelled training folder"),
    (["--universal-data", "x"], "--universal-data: expected no value unless --attack universal"),
    (["--steps", "0"], "--steps"),
    (["--restarts", "0"], "--restarts"),
    (["--step-size", "0"], "--step-size"),
    (["--step-size", "2"], "--step-size"),
    (["--eot", "0"], "--eot"),
    (["--alpha", "-1"], "--alpha"),
    (["--target", "-2"], "--target"),
    (["--universal-images", "0", "--attack", "universal", "--universal-data", "x"],
     "--universal-images"),
    (["--top-k", "2"], "--top-k"),
])
def test_bad_attack_options_are_refused_before_any_work(tmp_path, flags, message) -> None:
    import ray

    out = tmp_path / "run"
    code, output = attack("--data", str(tmp_path), "--model", "cifar_resnet20",
                          "--patch", "5", "--out", str(out), *flags)
    assert code == 2 and message in output, output
    assert not out.exists()
    assert not ray.is_initialized()


def test_a_target_outside_the_models_classes_is_refused_before_any_shard(
    tmp_path, cifar10_test_dir, serial_shards
) -> None:
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=1)
    code, output = attack("--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
                          str(MASKING), "--patch", "5", "--out", str(tmp_path / "run"),
                          "--target", "10")
    assert code != 0 and "--target" in output and "10" in output, output
    assert not list((tmp_path / "run").glob("attacks/*.parquet"))


def test_the_audit_catches_a_planted_unsound_certifier(
    tmp_path, cifar10_test_dir, serial_shards, monkeypatch
) -> None:
    """A test double that certifies every image: the attacked images the defense gets wrong
    without an alert are then certified images that were fooled, which the audit must list
    and fail on. The same run with the real certifier passes."""
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=2)
    args = ["--data", str(data), "--model", "cifar_resnet20", "--checkpoint", str(MASKING),
            "--patch", "5", "--method", "masking", "--attack", "detector", "--steps", "8",
            "--restarts", "1", "--location", "random"]
    code, output = attack(*args, "--out", str(tmp_path / "honest"))
    assert code == 0, output
    assert "audit passed: no certified image was fooled" in output
    honest = rows_of(tmp_path / "honest")
    assert len(honest) == 20 and all(row["status"] == "ok" for row in honest)
    fooled = [r for r in honest if r["detect_output"] not in (r["label"], -1)]
    assert fooled, "no attacked image got a wrong label past the defense: the plant needs some"
    assert not any(r["certified"] for r in fooled)

    real_certify = CertifierGroup.certify

    def certifies_everything(self, images, labels):
        return [replace(outcome, result=replace(outcome.result,
                                                certified=torch.ones_like(outcome.result.certified)))
                for outcome in real_certify(self, images, labels)]

    monkeypatch.setattr(CertifierGroup, "certify", certifies_everything)
    code, output = attack(*args, "--out", str(tmp_path / "planted"))
    assert code == EXIT_AUDIT_FAILED, output
    assert f"audit FAILED: {len(fooled)} certified images were fooled" in output
    for row in fooled:
        assert row["image_id"] in output
    report = json.loads((tmp_path / "planted" / "attack_report.json").read_text())
    assert sum(len(group["violations"]) for group in report["groups"]) == len(fooled)


def test_a_universal_patch_is_trained_once_and_reused_on_resume(
    tmp_path, cifar10_test_dir, serial_shards
) -> None:
    train = copy_class_subset(cifar10_test_dir, tmp_path / "train", per_class=3)
    data = tmp_path / "test"
    for folder in sorted(p for p in cifar10_test_dir.iterdir() if p.is_dir()):
        (data / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[20:22]:
            (data / folder.name / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "run"
    args = ["--data", str(data), "--model", "cifar_resnet20", "--checkpoint", str(MASKING),
            "--patch", "5", "--method", "masking", "--attack", "universal", "--steps", "4",
            "--universal-data", str(train), "--universal-images", "30",
            "--universal-epochs", "1", "--out", str(out), "--shard-size", "10"]
    code, output = attack(*args)
    assert code == 0, output
    assert "universal patch 5 px / masking: trained on 30 images" in output
    stored = json.loads((out / "universal" / "5px-masking.json").read_text())
    patch = torch.tensor(stored["patch"])
    assert patch.shape == (3, 5, 5) and 0.0 <= float(patch.min()) <= float(patch.max()) <= 1.0
    rows = rows_of(out)
    assert len(rows) == 20 and {r["attack"] for r in rows} == {"universal"}
    for row in rows:  # a 5 px box inside the image, at positions that vary
        top, left, bottom, right = row["patch_box"]
        assert (bottom - top, right - left) == (5, 5) and 0 <= top and bottom <= 32
    assert len({tuple(r["patch_box"]) for r in rows}) > 1

    (out / "attacks" / "part-00001.parquet").unlink()  # one shard lost: resumed, same patch
    code, output = attack(*args)
    assert code == 0, output
    assert "universal patch" not in output and "1 already done" in output
    assert json.loads((out / "universal" / "5px-masking.json").read_text()) == stored
    assert len(rows_of(out)) == 20


def test_report_on_an_attack_run_writes_the_attack_report_and_audits(
    tmp_path, cifar10_test_dir, serial_shards
) -> None:
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=1)
    out = tmp_path / "run"
    code, output = attack("--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
                          str(MASKING), "--patch", "5", "--method", "masking", "--steps", "3",
                          "--restarts", "1", "--location", "random", "--out", str(out))
    assert code == 0, output
    for name in ("attack_report.json", "attack_report.md", "attack_report.html"):
        (out / name).unlink()
    reported = CliRunner().invoke(main, ["report", str(out), "--out-dir", str(tmp_path / "r")])
    assert reported.exit_code == 0, reported.output
    assert "per-image on defended, masking      5 px: fools the undefended model" in reported.output
    assert "audit passed" in reported.output
    assert {p.name for p in (tmp_path / "r").iterdir()} == {
        "attack_report.json", "attack_report.md", "attack_report.html"}
    refused = CliRunner().invoke(main, ["report", str(out), "--against", str(out)])
    assert refused.exit_code == 2 and "is an attack run" in refused.output
