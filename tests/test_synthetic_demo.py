"""The offline demo's data and model: the synthetic texture set and the demo training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import pipeline.demo.synthetic as synthetic
from pipeline.compute.batches import load_image_folder
from pipeline.demo.model import demo_cert_config, demo_finetune_config, train_demo_model
from pipeline.demo.synthetic import synthetic_classes, write_synthetic_dataset
from scalecert import Certifier, load_model

REPO = Path(__file__).resolve().parents[1]
SMALL = {"train_per_class": 3, "test_per_class": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _leftovers(folder: Path) -> list[str]:
    """Hidden staging or trash folders next to the dataset."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_ten_sorted_descriptive_classes() -> None:
    names = synthetic_classes()
    assert len(names) == 10 == len(set(names))
    assert list(names) == sorted(names)
    assert {"checker", "rings", "stripes-horizontal", "stripes-vertical"} <= set(names)


def test_layout_counts_and_png_format(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", **SMALL, seed=0)
    assert root == tmp_path / "synth"
    assert sorted(p.name for p in root.iterdir()) == ["synthetic.json", "test", "train"]
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(synthetic_classes())
        for name in synthetic_classes():
            files = sorted((root / split / name).iterdir())
            assert [p.name for p in files] == [f"{i:04d}.png" for i in range(count)]
            for path in files:
                with Image.open(path) as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    description = json.loads((root / "synthetic.json").read_text())
    assert description["seed"] == 0 and description["version"] >= 1
    assert description["per_class"] == {"train": 3, "test": 2}
    assert description["classes"] == list(synthetic_classes())
    images, labels = load_image_folder(root / "train")
    assert images.shape == (30, 3, 32, 32)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert _leftovers(tmp_path) == []


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    first = _files(write_synthetic_dataset(tmp_path / "a", **SMALL, seed=0))
    second = _files(write_synthetic_dataset(tmp_path / "b", **SMALL, seed=0))
    other = _files(write_synthetic_dataset(tmp_path / "c", **SMALL, seed=1))
    assert first == second
    assert first.keys() == other.keys()
    pngs = [k for k in first if k.endswith(".png")]
    assert all(first[k] != other[k] for k in pngs)
    # Images are drawn per (split, class, index): more images only append.
    larger = _files(write_synthetic_dataset(tmp_path / "d", train_per_class=4,
                                            test_per_class=2, seed=0))
    assert all(larger[k] == first[k] for k in pngs)


def test_all_images_of_a_class_differ(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", train_per_class=5, test_per_class=5)
    images, _ = load_image_folder(root / "train")
    test_images, _ = load_image_folder(root / "test")
    everything = torch.cat([images, test_images]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == len(everything)


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", **SMALL)
    before = _mtimes(root)
    assert write_synthetic_dataset(tmp_path / "synth", **SMALL) == root
    assert _mtimes(root) == before
    # A different description is a different dataset: rewritten.
    write_synthetic_dataset(tmp_path / "synth", train_per_class=4, test_per_class=2)
    assert json.loads((root / "synthetic.json").read_text())["per_class"]["train"] == 4
    assert len(list((root / "train" / "rings").iterdir())) == 4


def test_interrupted_write_is_detected_and_regenerated(tmp_path: Path, monkeypatch) -> None:
    reference = _files(write_synthetic_dataset(tmp_path / "reference", **SMALL))
    root = tmp_path / "synth"
    real_write = synthetic._write_png
    calls = []

    def failing_write(path: Path, pixels) -> None:
        calls.append(path)
        if len(calls) > 7:
            raise KeyboardInterrupt("simulated interruption")
        real_write(path, pixels)

    monkeypatch.setattr(synthetic, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(root, **SMALL)
    assert not root.exists()  # nothing half-written under the real name
    monkeypatch.undo()
    assert _files(write_synthetic_dataset(root, **SMALL)) == reference

    # A run killed outright can leave a partial tree without the description; a deleted image
    # or a stale description also marks the set incomplete.
    (root / "synthetic.json").unlink()
    (root / "train" / "rings" / "0001.png").unlink()
    assert _files(write_synthetic_dataset(root, **SMALL)) == reference
    (root / "test" / "checker" / "0000.png").unlink()
    assert _files(write_synthetic_dataset(root, **SMALL)) == reference
    assert _leftovers(tmp_path) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="root"):
        write_synthetic_dataset(root, **SMALL)
    assert (root / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("values", "field"), [
    ({"train_per_class": 0}, "train_per_class"),
    ({"test_per_class": 2.5}, "test_per_class"),
    ({"seed": -1}, "seed"),
])
def test_invalid_arguments_name_the_field(tmp_path: Path, values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        write_synthetic_dataset(tmp_path / "synth", **values)


def test_demo_config_is_the_documented_setting() -> None:
    cert = demo_cert_config()
    assert (cert.patch_px, cert.top_k, cert.masks_per_axis, cert.method) == (
        5, 0.15, 6, "scalecert")
    assert demo_finetune_config(epochs=3, seed=4).cert == cert
    assert demo_finetune_config(epochs=3, seed=4).epochs == 3


def test_small_training_run_writes_a_loadable_checkpoint_once(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "synth", train_per_class=4, test_per_class=1)
    checkpoint = tmp_path / "models" / "demo.pt"
    seen = []
    assert train_demo_model(root, checkpoint, epochs=1, on_epoch=seen.append) == checkpoint
    sidecar = Path(f"{checkpoint}.json")
    assert checkpoint.is_file() and sidecar.is_file()
    assert [m.epoch for m in seen] == [1]
    metadata = json.loads(sidecar.read_text())
    assert metadata["model"] == "cifar_resnet20"
    assert metadata["finetune_config"] == json.loads(demo_finetune_config(1).to_json())
    assert [e["epoch"] for e in metadata["epochs"]] == [1]
    assert metadata["data"]["synthetic"]["per_class"] == {"train": 4, "test": 1}
    assert metadata["train_images"] == 40

    model = load_model("cifar_resnet20", checkpoint=checkpoint)
    assert model.num_classes == 10
    images, labels = load_image_folder(root / "test", limit=4)
    result = Certifier(model, demo_cert_config()).certify(images, labels)
    assert result.prediction.shape == (4,) and int(result.n_masks[0]) == 36

    # Same config and data: skipped (nothing rewritten, no epochs run).
    before = (checkpoint.stat().st_mtime_ns, sidecar.stat().st_mtime_ns)
    train_demo_model(root, checkpoint, epochs=1, on_epoch=seen.append)
    assert (checkpoint.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == before
    assert len(seen) == 1
    # A different config retrains.
    train_demo_model(root, checkpoint, epochs=1, seed=1, on_epoch=seen.append)
    assert len(seen) == 2
    assert json.loads(sidecar.read_text())["finetune_config"]["seed"] == 1


def test_training_needs_a_train_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_root"):
        train_demo_model(tmp_path, tmp_path / "demo.pt")


def test_the_demo_ends_with_the_runs_report_and_says_where_it_is(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The demo's last step writes the report `scalecert report <out>` writes, and prints where
    it is; here its data, training and certification are stand-ins (a finished run's folder),
    the end-to-end test below runs them for real."""
    import pipeline.cli as cli
    import pipeline.demo.model as demo_model
    from click.testing import CliRunner
    from test_report import ok_row, write_run

    out = tmp_path / "run"
    write_run(out, [[ok_row(f"cat/{i:04d}.png", 3, 3, certified=i % 2 == 0) for i in range(4)]])
    monkeypatch.setattr(synthetic, "write_synthetic_dataset", lambda root: Path(root))
    monkeypatch.setattr(demo_model, "train_demo_model", lambda data, path, on_epoch: path)
    monkeypatch.setattr(cli, "_run_and_report", lambda run, quiet: None)
    result = CliRunner().invoke(cli.main, ["demo", "--quiet", "--out", str(out),
                                           "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["groups"][0]["certified_accuracy"]["successes"] == 2
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "4/4 the run's report" in result.output
    assert f"wrote {out / 'report.json'}" in result.output
    assert result.output.rstrip().endswith(f"open {out / 'report.html'} to see what the run found")


@pytest.mark.slow
def test_scalecert_demo_end_to_end_quietly_then_idempotent(tmp_path: Path) -> None:
    """`scalecert demo` (what `make demo` runs) as its own process: generation, SIN training
    from scratch, and certification of the 500 test images through an embedded local Ray, which
    starts quietly (no advice such as Ray 2.60's token-authentication opt-out, which does not
    concern a local run); a second run reuses all."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from pipeline.cli import main

    args = ["demo", "--quiet", "--out", str(tmp_path / "run"), "--workdir", str(tmp_path / "work")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    first = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Token authentication" not in first.stderr, first.stderr
    assert "RAY_AUTH_MODE" not in first.stderr, first.stderr
    rows = [row for part in sorted((tmp_path / "run" / "certificates").glob("*.parquet"))
            for row in pq.read_table(part).to_pylist()]
    assert len(rows) == 500 and all(r["status"] == "ok" for r in rows)
    pruned = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    certified = sum(r["certified"] for r in rows) / len(rows)
    assert pruned >= 0.9, pruned
    assert certified >= 0.5, certified
    assert f"certified accuracy scalecert    5 px: {100 * certified:5.1f}%" in first.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())  # the demo's last step
    assert report["groups"][0]["certified_accuracy"]["value"] == certified
    assert f"open {tmp_path / 'run' / 'report.html'}" in first.stdout

    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "epoch" not in second.output and "5 of 5 shards already done" in second.output
