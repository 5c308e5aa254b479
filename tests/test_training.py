"""``scalecert finetune`` on Ray Train: two DDP workers, checkpoints each epoch, resume after an
interruption (to the same weights as an uninterrupted run), refusals, S3 data and the masking
control through the command line. Real Ray (local), real CIFAR-10 JPEGs, real weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.io.images import Preprocess
from pipeline.io.sources import open_dataset
from pipeline.io.storage import S3Options
from pipeline.train.config import FinetuneRun
from pipeline.train.trainer import (
    FinetuneRefused,
    data_fingerprint,
    final_checkpoint_location,
    load_slice,
    run_finetune,
)
from scalecert.errors import RunFailed
from scalecert.models.registry import file_sha256, load_model
from tests.support import copy_class_subset, short_temp_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_sets(cifar10_test_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, held-out): 6 and 3 images per class of the shared test JPEGs; the training set
    also holds one corrupt file, which must be skipped and listed, not fatal."""
    root = tmp_path_factory.mktemp("tiny")
    train = copy_class_subset(cifar10_test_dir, root / "train", per_class=6)
    (train / "cat" / "zz-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    held_out = root / "held_out"
    for folder in sorted(p for p in cifar10_test_dir.iterdir() if p.is_dir()):
        (held_out / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[10:13]:
            (held_out / folder.name / path.name).write_bytes(path.read_bytes())
    return train, held_out


def _run(train: Path, held_out: Path, checkpoint: Path, out: Path, **changes) -> FinetuneRun:
    run = FinetuneRun(data=str(train), model="cifar_resnet20", out=str(out), patch="2.4%",
                      checkpoint=str(checkpoint), epochs=2, batch_size=16, lr=0.02, workers=2,
                      eval_data=str(held_out))
    return replace(run, **changes)


def _state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_workers_train_checkpoint_each_epoch_and_resume_to_the_same_weights(
    tiny_sets, resnet20_checkpoint, tmp_path, monkeypatch
):
    import ray

    train, held_out = tiny_sets
    straight = _run(train, held_out, resnet20_checkpoint, tmp_path / "straight")
    events: list[tuple] = []
    summary = run_finetune(straight, on_event=events.append)
    assert not ray.is_initialized()  # the run shut down the Ray it started

    # the final checkpoint loads as a model for certify; the sidecar says how it was made
    assert summary.checkpoint == final_checkpoint_location(straight)
    assert summary.sha256 == file_sha256(summary.checkpoint)
    model = load_model("cifar_resnet20", summary.checkpoint)
    start = load_model("cifar_resnet20", resnet20_checkpoint)
    assert not torch.equal(model.conv1.weight, start.conv1.weight)  # it did train
    sidecar = json.loads(Path(summary.checkpoint + ".json").read_text())
    assert sidecar["finetune"]["cert"]["patch_px"] == 5 and sidecar["finetune"]["epochs"] == 2
    assert sidecar["workers"] == 2 and sidecar["device"] == "cpu"
    assert sidecar["made_by"].startswith("scalecert finetune --data ")
    assert sidecar["data"]["listed"] == 61 and sidecar["data"]["usable"] == 60
    assert list(sidecar["data"]["skipped"]) == ["cat/zz-corrupt.jpg"]
    dataset = open_dataset(str(train))
    digests = load_slice(dataset.records, Preprocess.for_input_size(32), S3Options(), 10, 2).digests
    assert sidecar["data"]["fingerprint"] == data_fingerprint(dataset.records, digests)
    assert [m["epoch"] for m in sidecar["epochs"]] == [1, 2]
    for metrics in sidecar["epochs"]:
        assert metrics["images"] == 60 and metrics["eval_images"] == 30
        assert 0.0 <= metrics["eval_certified"] <= metrics["eval_accuracy"] <= 1.0
    assert sidecar["epochs"][1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ran to the end
    steps = [e for e in events if e[0] == "step"]
    assert steps[-1] == ("step", 2, 4, 4)  # 30 images per worker, 8 per step
    assert [e[1]["epoch"] for e in events if e[0] == "epoch"] == [1, 2]

    # interrupted after epoch 1, then the same command again: resumes at epoch 2. Both runs
    # join a Ray that is already up (one start for the two) and leave it running.
    interrupted = _run(train, held_out, resnet20_checkpoint, tmp_path / "interrupted")
    temp_dir = short_temp_dir("tr")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _temp_dir=str(temp_dir))
    try:
        monkeypatch.setenv("SCALECERT_TEST_FAIL_AFTER_EPOCH", "1")
        with pytest.raises(RunFailed, match="training failed"):
            run_finetune(interrupted)
        assert not Path(final_checkpoint_location(interrupted)).exists()
        assert (tmp_path / "interrupted" / "finetune.json").exists()
        monkeypatch.delenv("SCALECERT_TEST_FAIL_AFTER_EPOCH")
        resumed_events: list[tuple] = []
        resumed = run_finetune(interrupted, on_event=resumed_events.append)
        assert ray.is_initialized()  # a Ray it did not start stays up
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [e[1]["epoch"] for e in resumed_events if e[0] == "epoch"] == [2]
    assert {e[1] for e in resumed_events if e[0] == "step"} == {2}
    assert [m["epoch"] for m in resumed.epochs] == [1, 2]
    def timeless(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "seconds"}

    assert timeless(resumed.epochs[0]) == timeless(sidecar["epochs"][0])
    a, b = _state(summary.checkpoint), _state(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from a straight run"

    # the same command once more: nothing to do, no Ray; other options on that folder: refused
    again = run_finetune(straight)
    assert again.already_done and again.sha256 == summary.sha256
    with pytest.raises(FinetuneRefused, match="another fine-tuning run"):
        run_finetune(replace(straight, lr=0.05))
    assert not ray.is_initialized()


def test_cli_finetunes_the_masking_control_from_and_to_s3_for_the_worst_window(
    s3_env, s3_server, tiny_sets, resnet20_checkpoint, tmp_path
):
    train, _ = tiny_sets
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    for path in sorted(train.rglob("*.jpg")):
        client.put_object(Bucket=s3_env, Key=f"train/{path.relative_to(train)}",
                          Body=path.read_bytes())
    args = ["finetune", "--quiet", "--data", f"s3://{s3_env}/train", "--model", "cifar_resnet20",
            "--checkpoint", str(resnet20_checkpoint), "--out", f"s3://{s3_env}/runs/masking",
            "--patch", "2", "--method", "masking", "--epochs", "1", "--batch-size", "20",
            "--workers", "1", "--s3-endpoint", s3_server.endpoint, "--objective", "worst-window"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "epoch 1: loss" in result.output and "(1 skipped)" in result.output
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_env, Prefix="runs/")["Contents"]}
    assert {"runs/masking/finetune.json", "runs/masking/cifar_resnet20-masking.pt",
            "runs/masking/cifar_resnet20-masking.pt.json"} <= keys
    assert any(k.startswith("runs/masking/ray-train/") and k.endswith("state.pt") for k in keys)
    body = client.get_object(Bucket=s3_env, Key="runs/masking/cifar_resnet20-masking.pt.json")
    sidecar = json.loads(body["Body"].read())
    assert sidecar["method"] == "masking" and sidecar["finetune"]["cert"]["method"] == "masking"
    assert sidecar["finetune"]["objective"] == "worst-window"  # the objective ran on Ray Train
    assert sidecar["data"]["source"] == f"s3://{s3_env}/train"
    assert sidecar["data"]["usable"] == 60 and "eval_accuracy" not in sidecar["epochs"][0]
    weights = tmp_path / "masking.pt"
    weights.write_bytes(client.get_object(
        Bucket=s3_env, Key="runs/masking/cifar_resnet20-masking.pt")["Body"].read())
    trained, start = _state(str(weights)), load_model("cifar_resnet20", resnet20_checkpoint)
    assert not torch.equal(trained["linear.weight"], start.linear.weight)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "already done" in again.output


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 15}, "--batch-size: expected a multiple of --workers"),
    ({"model": "vgg"}, "--model: unknown model 'vgg'"),
    ({"patch": "0px"}, "patch: '0px' must be a whole number"),
    ({"top_k": 1.5}, "--top-k"),
    ({"epochs": 0}, "--epochs: expected an integer >= 1"),
    ({"eval_limit": 5}, "--eval-limit: expected --eval-data as well"),
    ({"mask_probability": 2.0}, "--mask-probability"),
    ({"method": "pg"}, "--method: expected one of"),
])
def test_bad_options_are_refused_before_any_work(changes, message):
    values = dict(data="d", model="cifar_resnet20", out="o", patch="2.4%", workers=2)
    values.update(changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FinetuneRun(**values)


def test_cli_names_missing_options_and_unknown_yaml_keys(tmp_path):
    result = CliRunner().invoke(main, ["finetune", "--model", "cifar_resnet20"])
    assert result.exit_code == 2 and "missing required option(s): --data, --out, --patch" in result.output
    config = tmp_path / "finetune.yaml"
    config.write_text("data: d\nmodel: cifar_resnet20\nout: o\npatch: 2.4%\nepoch: 3\n")
    result = CliRunner().invoke(main, ["finetune", "--config", str(config)])
    assert result.exit_code == 2 and "unknown option 'epoch'" in result.output
    config.write_text("data: d\nmodel: cifar_resnet20\nout: o\npatch: 2.4%\nepochs: 3\n")
    run = FinetuneRun.from_sources(config, {"lr": 0.05})
    assert (run.epochs, run.lr) == (3, 0.05)
    assert run.command_line() == ("scalecert finetune --data d --model cifar_resnet20 --out o "
                                  "--patch 2.4% --epochs 3 --lr 0.05")


def test_missing_data_or_weights_fail_before_training(tiny_sets, tmp_path):
    train, _ = tiny_sets
    with pytest.raises(FileNotFoundError):
        run_finetune(FinetuneRun(data=str(tmp_path / "nowhere"), model="cifar_resnet20",
                                 out=str(tmp_path / "o"), patch="5"))
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        run_finetune(FinetuneRun(data=str(train), model="cifar_resnet20", out=str(tmp_path / "o"),
                                 patch="5", checkpoint=str(tmp_path / "missing.th")))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_data_fingerprint_follows_the_bytes(tiny_sets, tmp_path):
    train, _ = tiny_sets
    copy = copy_class_subset(train, tmp_path / "copy", per_class=2)
    dataset = open_dataset(str(copy))
    preprocess = Preprocess.for_input_size(32)
    first = load_slice(dataset.records, preprocess, S3Options(), 10, 2)
    assert len(first.labels) == 20 and not first.skipped
    assert first.images.dtype == torch.uint8 and tuple(first.images.shape) == (20, 3, 32, 32)
    target = Path(dataset.records[0].location)
    target.write_bytes(Path(dataset.records[1].location).read_bytes())
    second = load_slice(dataset.records, preprocess, S3Options(), 10, 2)
    assert data_fingerprint(dataset.records, first.digests) != data_fingerprint(
        dataset.records, second.digests)
    few_classes = load_slice(dataset.records, preprocess, S3Options(), 5, 2)
    assert len(few_classes.labels) == 10
    assert set(few_classes.skipped.values()) == {"label 5 is outside the model's 5 classes",
                                                 "label 6 is outside the model's 5 classes",
                                                 "label 7 is outside the model's 5 classes",
                                                 "label 8 is outside the model's 5 classes",
                                                 "label 9 is outside the model's 5 classes"}


def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tiny_sets, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the refusal cannot happen here")
    train, _ = tiny_sets
    with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
        run_finetune(FinetuneRun(data=str(train), model="cifar_resnet20", out=str(tmp_path / "o"),
                                 patch="5", device="cuda"))
    assert not (tmp_path / "o").exists()
