"""End-to-end runs of ``scalecert certify`` with an embedded local Ray, on real data."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support import copy_class_subset, dies_on_first_try, invoke_report, local_ray

from pipeline.certify.driver import run_certification
from pipeline.cli import main
from pipeline.compute.batches import load_image_folder
from pipeline.run.config import RunConfig
from scalecert import CertConfig, Certifier, load_model
from scalecert.errors import ModelChanged

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module, in its own temp dir."""
    with local_ray("e2e"):
        yield


def certify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["certify", "--quiet", *args])
    return result.exit_code, result.output + (repr(result.exception) if result.exception else "")


def read_rows(out: Path) -> list[dict]:
    parts = sorted((out / "certificates").glob("part-*.parquet"))
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def test_cifar10_run_two_patches_two_methods_then_resume(
    ray_session, tmp_path, cifar10_test_dir, resnet20_checkpoint
) -> None:
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=6)
    out = tmp_path / "run"
    args = ["--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
            str(resnet20_checkpoint), "--patch", "2.4%", "--patch", "0.4%", "--method",
            "scalecert", "--method", "masking", "--out", str(out), "--shard-size", "18"]
    code, output = certify(*args)
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["images"] == 60 and len(manifest["shards"]) == 4
    assert manifest["dataset"]["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert manifest["patch_px"] == [5, 2]
    rows = read_rows(out)
    assert len(rows) == 60 * 2 * 2
    keys = {(r["image_id"], r["patch_px"], r["method"]) for r in rows}
    assert len(keys) == len(rows)
    assert all(r["status"] == "ok" and r["run_id"] == manifest["run_id"] for r in rows)
    metadata = pq.read_schema(out / "certificates" / "part-00000.parquet").metadata
    assert json.loads(metadata[b"scalecert"])["fingerprint"] == manifest["fingerprint"]
    assert "certified accuracy scalecert    5 px" in output

    # the pipeline's certificates are the library's certificates
    images, labels = load_image_folder(data)
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    direct = Certifier(model, CertConfig(patch_px=5, top_k=0.15)).certify(images, labels)
    ids = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*"))
    pipeline_rows = {r["image_id"]: r for r in rows if r["patch_px"] == 5 and r["method"] == "scalecert"}
    assert [pipeline_rows[i]["certified"] for i in ids] == direct.certified.tolist()
    assert [pipeline_rows[i]["prediction"] for i in ids] == direct.prediction.tolist()
    assert [pipeline_rows[i]["clean_output"] for i in ids] == direct.clean_output.tolist()

    # --full-map: every mask run and stored; the same outcomes with at least as much work
    mapped_out = tmp_path / "run-full-map"
    code, output = certify("--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
                           str(resnet20_checkpoint), "--patch", "2.4%", "--out", str(mapped_out),
                           "--full-map")
    assert code == 0, output
    mapped = {r["image_id"]: r for r in read_rows(mapped_out)}
    assert all(len(r["mask_predictions"]) == 36 for r in mapped.values())
    assert all(r["mask_predictions"] is None for r in rows)
    for image_id, row in pipeline_rows.items():
        full = mapped[image_id]
        assert (full["certified"], full["clean_output"]) == (row["certified"], row["clean_output"])
        assert full["n_evaluated"] >= row["n_evaluated"]
    assert sum(r["n_evaluated"] for r in mapped.values()) > sum(
        r["n_evaluated"] for r in pipeline_rows.values())

    # resume: nothing is recomputed
    stamps = {p: p.stat().st_mtime_ns for p in (out / "certificates").iterdir()}
    code, output = certify(*args)
    assert code == 0, output
    assert "4 of 4 shards already done" in output
    assert {p: p.stat().st_mtime_ns for p in (out / "certificates").iterdir()} == stamps

    # another configuration into the same folder is refused before any work
    code, output = certify(*args, "--top-k", "0.2")
    assert code != 0 and "different configuration" in output
    assert {p: p.stat().st_mtime_ns for p in (out / "certificates").iterdir()} == stamps


def test_a_worker_killed_mid_shard_loses_nothing(
    ray_session, tmp_path, cifar10_test_dir, resnet20_checkpoint, capsys
) -> None:
    """The first try of shard 1 kills its worker's process after certifying, before writing
    (a test double through the driver's worker=): the shard is retried on the restarted
    worker and every image ends with its rows."""
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=6)
    out = tmp_path / "run"
    run = RunConfig(data=str(data), model="cifar_resnet20", checkpoint=str(resnet20_checkpoint),
                    patches=("5",), out=str(out), shard_size=20, workers=2)
    summary = run_certification(run, worker=dies_on_first_try(1, tmp_path / "died"))
    assert (tmp_path / "died").exists()  # the double did kill a worker
    assert "worker lost on shard 1 (attempt 1); retrying" in capsys.readouterr().err
    assert (summary.images, summary.shards, summary.errors) == (60, 3, 0)
    rows = read_rows(out)
    assert sorted(r["image_id"] for r in rows) == sorted(
        p.relative_to(data).as_posix() for p in data.glob("*/*"))
    assert len({r["shard"] for r in rows}) == 3


def test_a_checkpoint_rewritten_mid_run_stops_the_run_and_writes_none_of_its_rows(
    ray_session, tmp_path, cifar10_test_dir, resnet20_checkpoint
) -> None:
    """Scheduled audits point at paths that training jobs rewrite: after the first shard the
    checkpoint file is replaced by other weights and the worker dies, so its restart reads the
    new file. The run must stop naming the file and both hashes, keep only rows of the planned
    model, and a rerun with the file restored must finish with the clean run's rows."""
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=6)
    checkpoint = tmp_path / "latest.th"
    checkpoint.write_bytes(resnet20_checkpoint.read_bytes())
    planned = checkpoint.read_bytes()
    other = (REPO_ROOT / "models" / "cifar10-resnet20-masking-2.4.pt").read_bytes()
    run = RunConfig(data=str(data), model="cifar_resnet20", checkpoint=str(checkpoint),
                    patches=("5",), methods=("scalecert",), out=str(tmp_path / "run"),
                    shard_size=20, workers=1)

    def swap_after_first_shard(summary) -> None:
        if summary.index == 0:
            checkpoint.write_bytes(other)

    with pytest.raises(ModelChanged) as caught:  # shard 1's worker dies before writing
        run_certification(run, progress=swap_after_first_shard,
                          worker=dies_on_first_try(1, tmp_path / "died"))
    message = str(caught.value)
    assert str(checkpoint) in message
    assert hashlib.sha256(planned).hexdigest() in message
    assert hashlib.sha256(other).hexdigest() in message
    written = sorted(p.name for p in (tmp_path / "run" / "certificates").iterdir())
    assert written == ["part-00000.parquet"]  # shard 0, certified before the swap

    # restored, the same run resumes and ends with the planned model's certificates
    checkpoint.write_bytes(planned)
    summary = run_certification(run)
    assert (summary.shards, summary.shards_skipped) == (3, 1)
    rows = {r["image_id"]: r for r in read_rows(tmp_path / "run")}
    images, labels = load_image_folder(data)
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    direct = Certifier(model, CertConfig(patch_px=5, top_k=0.15)).certify(images, labels)
    ids = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*"))
    for name in ("certified", "prediction", "clean_output"):
        assert [rows[i][name] for i in ids] == getattr(direct, name).tolist(), name


def bad_image_zoo(root: Path, good_jpeg: bytes) -> dict[str, str | None]:
    """Write a class folder of odd files; returns image_id -> expected error fragment."""
    folder = root / "cat"
    folder.mkdir(parents=True)
    rgb = Image.open(io.BytesIO(good_jpeg)).convert("RGB")

    def save(name: str, image: Image.Image, fmt: str) -> None:
        image.save(folder / name, format=fmt)

    (folder / "a-good.jpg").write_bytes(good_jpeg)
    (folder / "b-empty.jpg").write_bytes(b"")
    (folder / "c-truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "d-not-an-image.jpg").write_bytes(b"hello, this is text\n" * 10)
    save("e-cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("f-grey.jpg", rgb.convert("L"), "JPEG")
    save("g-alpha.png", rgb.convert("RGBA"), "PNG")
    save("h-tiny.png", rgb.resize((1, 1)), "PNG")
    save("i-wrong-size.png", rgb.resize((40, 24)), "PNG")
    (root / "stray.jpg").write_bytes(good_jpeg)  # not in a class folder: no label
    return {
        "cat/a-good.jpg": None, "cat/b-empty.jpg": "empty", "cat/c-truncated.jpg": "truncated",
        "cat/d-not-an-image.jpg": "not an image", "cat/e-cmyk.jpg": None, "cat/f-grey.jpg": None,
        "cat/g-alpha.png": None, "cat/h-tiny.png": "too small", "cat/i-wrong-size.png": "40x24",
        "stray.jpg": "no label",
    }


def test_bad_images_become_error_rows_and_the_run_finishes(
    ray_session, tmp_path, cifar10_test_dir, resnet20_checkpoint
) -> None:
    good = (cifar10_test_dir / "cat" / "0000.jpg").read_bytes()
    expected = bad_image_zoo(tmp_path / "zoo", good)
    out = tmp_path / "run"
    code, output = certify("--data", str(tmp_path / "zoo"), "--model", "cifar_resnet20",
                           "--checkpoint", str(resnet20_checkpoint), "--patch", "5",
                           "--out", str(out))
    assert code == 0, output
    rows = {r["image_id"]: r for r in read_rows(out)}
    assert set(rows) == set(expected)
    for image_id, fragment in expected.items():
        row = rows[image_id]
        if fragment is None:
            assert row["status"] == "ok", (image_id, row["error"])
            assert row["prediction"] is not None
        else:
            assert row["status"] == "error" and fragment in row["error"], (image_id, row["error"])
            assert row["certified"] is False and row["prediction"] is None
    assert "6 errors" in output


def test_imagenet_sample_with_resnet50(ray_session, tmp_path, shared_dir) -> None:
    source = shared_dir / "data" / "imagenet-sample"
    root = tmp_path / "imagenet"
    for path in sorted(source.glob("*.JPEG")):
        synset = path.name.split("_")[0]
        (root / synset).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / synset / path.name)
    out = tmp_path / "run"
    torch.manual_seed(0)
    synsets_file = source / "synsets.txt"
    code, output = certify("--data", str(root), "--synsets", str(synsets_file), "--model",
                           "resnet50", "--patch", "2%", "--masks-per-axis", "3", "--out", str(out),
                           "--limit", "3", "--batch-size", "16")
    assert code == 0, output
    rows = read_rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["listed"] == len(list(source.glob("*.JPEG")))
    assert manifest["patch_px"] == [32] and manifest["image_side"] == 224
    assert len(rows) == 3 and all(r["status"] == "ok" and r["n_masks"] == 9 for r in rows)
    synsets = [line.split()[0] for line in synsets_file.read_text().splitlines() if line.strip()]
    assert len(synsets) == 1000
    assert [r["label"] for r in sorted(rows, key=lambda r: r["image_id"])] == [
        synsets.index(r["image_id"].split("/")[0]) for r in sorted(rows, key=lambda r: r["image_id"])]



def test_recovery_beside_detection_in_one_run_and_its_report(
    ray_session, tmp_path, cifar10_test_dir
) -> None:
    """PatchCleanser and the masking baseline on the same images and windows, in one run:
    recovery rows never alert, equal the library's, and the report keeps them apart."""
    checkpoint = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet20-masking-2.4.pt"
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=2)
    out = tmp_path / "run"
    code, output = certify("--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
                           str(checkpoint), "--patch", "2.4%", "--method", "masking",
                           "--method", "patchcleanser", "--out", str(out))
    assert code == 0, output
    rows = [r for r in read_rows(out) if r["method"] == "patchcleanser"]
    assert len(rows) == 20 and all(r["status"] == "ok" for r in rows)
    assert all(r["clean_output"] >= 0 and r["alert_box"] is None
               and r["recovered_prediction"] is None for r in rows)
    # confidences are a detection rule's figures: null in recovery rows, set in masking's
    assert all(r["min_confidence"] is None and r["max_alert_confidence"] is None for r in rows)
    assert all(0 < r["min_confidence"] <= 1 and 0 <= r["max_alert_confidence"] <= 1
               for r in read_rows(out) if r["method"] == "masking")
    images, labels = load_image_folder(data)
    model = load_model("cifar_resnet20", checkpoint=checkpoint)
    direct = Certifier(model, CertConfig(patch_px=5, method="patchcleanser"),
                       full_map=False).certify(images, labels)
    ids = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*"))
    by_id = {r["image_id"]: r for r in rows}
    assert [by_id[i]["certified"] for i in ids] == direct.certified.tolist()
    assert [by_id[i]["clean_output"] for i in ids] == direct.clean_output.tolist()
    assert [by_id[i]["n_evaluated"] for i in ids] == direct.n_evaluated.tolist()

    reported = CliRunner().invoke(main, ["report", str(out)])
    assert reported.exit_code == 0, reported.output
    assert "patchcleanser       5 px  certified recovery " in reported.output
    doc = json.loads((out / "report.json").read_text())
    groups = {g["method"]: g for g in doc["groups"]}
    assert groups["patchcleanser"]["guarantee"] == "recovery"
    assert groups["patchcleanser"]["false_alert_rate"] is None
    assert groups["masking"]["guarantee"] == "detection"
    assert groups["masking"]["false_alert_rate"]["n"] == 20
    assert groups["patchcleanser"]["certified_accuracy"]["successes"] == int(direct.certified.sum())
    markdown = (out / "report.md").read_text()
    detection_at = markdown.index("### Certified detection")
    recovery_at = markdown.index("### Certified recovery")
    recovery_table = markdown[recovery_at:].split("\n\n")[1]
    assert "| patchcleanser | 5 px |" in recovery_table and "false alerts" not in recovery_table
    assert "| masking | 5 px |" in markdown[detection_at:recovery_at]
    page = (out / "report.html").read_text()
    assert 'id="measured-recovery"' in page and "measured: patchcleanser (recovery)" in page


def test_attack_run_on_ray_certifies_attacks_detects_and_resumes(
    ray_session, tmp_path, cifar10_test_dir
) -> None:
    """`scalecert attack` through the Ray pipeline: one row per (image, method), the
    ``certified`` column is the library's certificate of the clean image with the same
    options, the attacked images fool the undefended model, the audit passes, and a rerun
    recomputes nothing."""
    checkpoint = Path(__file__).resolve().parent.parent / "models" / "cifar10-resnet20-masking-2.4.pt"
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=2)
    out = tmp_path / "run"
    args = ["attack", "--quiet", "--data", str(data), "--model", "cifar_resnet20",
            "--checkpoint", str(checkpoint), "--patch", "2.4%", "--method", "masking",
            "--method", "scalecert", "--attack-model", "undefended", "--steps", "10",
            "--restarts", "1", "--out", str(out), "--shard-size", "10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "audit passed: no certified image was fooled" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == "attack" and manifest["attack"]["attack_model"] == "undefended"
    rows = [row for part in sorted((out / "attacks").glob("part-*.parquet"))
            for row in pq.read_table(part).to_pylist()]
    assert len(rows) == 40 and {r["method"] for r in rows} == {"masking", "scalecert"}
    assert all(r["status"] == "ok" and r["run_id"] == manifest["run_id"] for r in rows)
    images, labels = load_image_folder(data)
    model = load_model("cifar_resnet20", checkpoint=checkpoint)
    ids = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*"))
    for method in ("masking", "scalecert"):
        direct = Certifier(model, CertConfig(patch_px=5, method=method)).certify(images, labels)
        by_id = {r["image_id"]: r for r in rows if r["method"] == method}
        assert [by_id[i]["certified"] for i in ids] == direct.certified.tolist()
        assert [by_id[i]["prediction"] for i in ids] == direct.prediction.tolist()
    right = [r for r in rows if r["vanilla_prediction"] == r["label"]]
    assert sum(r["attacked_vanilla_prediction"] != r["label"] for r in right) > len(right) / 2
    for row in rows:
        if row["detect_output"] == -1 and row["alert_box"] is not None:
            assert row["localized"] is not None
        if row["detect_output"] != -1:
            assert row["localized"] is None and row["detect_output"] == row["attacked_prediction"]
    assert (out / "attack_report.md").is_file() and (out / "attack_report.html").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in (out / "attacks").iterdir()}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "2 of 2 shards already done" in again.output
    assert {p: p.stat().st_mtime_ns for p in (out / "attacks").iterdir()} == stamps


def test_audit_catches_a_degraded_model(ray_session, tmp_path: Path, cifar10_test_dir: Path,
                                        resnet20_checkpoint: Path) -> None:
    """`scalecert report --against`: a run of noisy weights against a run of the real ones on
    the same images fails the audit (exit 3) unless --max-drop allows the drop."""
    data = copy_class_subset(cifar10_test_dir, tmp_path / "cifar", per_class=5)
    state = torch.load(resnet20_checkpoint, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    generator = torch.Generator().manual_seed(0)
    noisy = {k: (v + 0.3 * v.std() * torch.randn(v.shape, generator=generator)
                 if v.is_floating_point() and v.ndim > 1 else v) for k, v in state.items()}
    degraded = tmp_path / "degraded.pt"
    torch.save(noisy, degraded)
    runs = {}  # masking: the un-fine-tuned ResNet-20 certifies ~40% of these at 2 px
    for name, checkpoint in (("good", resnet20_checkpoint), ("degraded", degraded)):
        runs[name] = tmp_path / name
        code, output = certify("--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
                               str(checkpoint), "--patch", "0.4%", "--method", "masking",
                               "--out", str(runs[name]))
        assert code == 0, output
    code, output = invoke_report(str(runs["degraded"]), "--against", str(runs["good"]))
    assert code == 3, output
    doc = json.loads((runs["degraded"] / "report.json").read_text())
    diff = doc["diff"]["groups"][0]
    assert diff["certified_drop_pp"] > 1.0 and diff["lost_certification"]
    rows = [r for part in sorted((runs["degraded"] / "certificates").glob("*.parquet"))
            for r in pq.read_table(part).to_pylist()]
    assert doc["groups"][0]["certified_accuracy"]["successes"] == sum(r["certified"] for r in rows)
    assert invoke_report(str(runs["degraded"]), "--against", str(runs["good"]),
                     "--max-drop", "100")[0] == 0
    code, output = invoke_report(str(runs["good"]), "--against", str(runs["good"]))
    assert code == 0 and "lost 0 gained 0" in output
