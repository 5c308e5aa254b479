"""``scalecert finetune`` on Ray Train: two DDP workers, from and to S3, checkpoints each epoch,
resume after an interruption (to the same weights as an uninterrupted run), refusals, through
the command line and the library. Real Ray (local), real CIFAR-10 JPEGs, real weights, a real
S3 endpoint (moto)."""

from __future__ import annotations

import json
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
from tests.support import copy_class_subset, local_ray

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


def _state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_workers_train_from_s3_checkpoint_each_epoch_and_resume_to_the_same_weights(
    s3_env, s3_server, tiny_sets, resnet20_checkpoint, tmp_path, monkeypatch
):
    """The masking control with the worst-window objective, data and output on S3: one run
    straight through the command line, one interrupted after epoch 1 and rerun through the
    library; both end with the same weights."""
    import ray

    train, held_out = tiny_sets
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    for path in sorted(train.rglob("*.jpg")):
        client.put_object(Bucket=s3_env, Key=f"train/{path.relative_to(train)}",
                          Body=path.read_bytes())
    data, out = f"s3://{s3_env}/train", f"s3://{s3_env}/runs/straight"
    args = ["finetune", "--quiet", "--data", data, "--model", "cifar_resnet20", "--checkpoint",
            str(resnet20_checkpoint), "--out", out, "--patch", "2.4%", "--method", "masking",
            "--objective", "worst-window", "--epochs", "2", "--batch-size", "16", "--lr", "0.02",
            "--workers", "2", "--eval-data", str(held_out), "--s3-endpoint", s3_server.endpoint]
    straight = FinetuneRun(data=data, model="cifar_resnet20", out=out, patch="2.4%",
                           checkpoint=str(resnet20_checkpoint), method="masking",
                           objective="worst-window", epochs=2, batch_size=16, lr=0.02,
                           workers=2, eval_data=str(held_out), s3_endpoint=s3_server.endpoint)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "epoch 1: loss" in result.output and "epoch 2: loss" in result.output
    assert "(1 skipped)" in result.output
    assert not ray.is_initialized()  # the run shut down the Ray it started

    # on S3: the manifest, a Ray Train checkpoint per epoch, the weights and their sidecar
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_env, Prefix="runs/")["Contents"]}
    assert {"runs/straight/finetune.json", "runs/straight/cifar_resnet20-masking.pt",
            "runs/straight/cifar_resnet20-masking.pt.json"} <= keys
    assert any(k.startswith("runs/straight/ray-train/") and k.endswith("state.pt") for k in keys)
    weights = tmp_path / "straight.pt"
    weights.write_bytes(client.get_object(
        Bucket=s3_env, Key="runs/straight/cifar_resnet20-masking.pt")["Body"].read())
    model = load_model("cifar_resnet20", weights)  # loads as a model for certify
    start = load_model("cifar_resnet20", resnet20_checkpoint)
    assert not torch.equal(model.conv1.weight, start.conv1.weight)  # it did train
    sidecar = json.loads(client.get_object(
        Bucket=s3_env, Key="runs/straight/cifar_resnet20-masking.pt.json")["Body"].read())
    assert sidecar["method"] == "masking" and sidecar["finetune"]["cert"]["method"] == "masking"
    assert sidecar["finetune"]["objective"] == "worst-window"  # the objective ran on Ray Train
    assert sidecar["finetune"]["cert"]["patch_px"] == 5 and sidecar["finetune"]["epochs"] == 2
    assert sidecar["workers"] == 2 and sidecar["device"] == "cpu"
    assert sidecar["made_by"] == straight.command_line()
    assert sidecar["data"]["source"] == data
    assert sidecar["data"]["listed"] == 61 and sidecar["data"]["usable"] == 60
    assert list(sidecar["data"]["skipped"]) == ["cat/zz-corrupt.jpg"]
    s3 = S3Options(endpoint=s3_server.endpoint)
    dataset = open_dataset(data, s3)
    digests = load_slice(dataset.records, Preprocess.for_input_size(32), s3, 10, 2).digests
    assert sidecar["data"]["fingerprint"] == data_fingerprint(dataset.records, digests)
    assert [m["epoch"] for m in sidecar["epochs"]] == [1, 2]
    for metrics in sidecar["epochs"]:
        assert metrics["images"] == 60 and metrics["eval_images"] == 30
        assert 0.0 <= metrics["eval_certified"] <= metrics["eval_accuracy"] <= 1.0
    assert sidecar["epochs"][1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ran to the end

    # interrupted after epoch 1, then the same run again: resumes at epoch 2. Both runs join a
    # Ray that is already up (one start for the two) and leave it running.
    interrupted = replace(straight, out=f"s3://{s3_env}/runs/interrupted")
    with local_ray("tr"):
        monkeypatch.setenv("SCALECERT_TEST_FAIL_AFTER_EPOCH", "1")
        with pytest.raises(RunFailed, match="training failed"):
            run_finetune(interrupted)
        assert client.list_objects_v2(Bucket=s3_env, Prefix="runs/interrupted/finetune.json")[
            "KeyCount"] == 1
        assert client.list_objects_v2(Bucket=s3_env, Prefix=final_checkpoint_location(
            interrupted).removeprefix(f"s3://{s3_env}/"))["KeyCount"] == 0
        monkeypatch.delenv("SCALECERT_TEST_FAIL_AFTER_EPOCH")
        events: list[tuple] = []
        resumed = run_finetune(interrupted, on_event=events.append)
        assert ray.is_initialized()  # a Ray it did not start stays up
    assert [e[1]["epoch"] for e in events if e[0] == "epoch"] == [2]
    steps = [e for e in events if e[0] == "step"]
    assert {e[1] for e in steps} == {2} and steps[-1] == ("step", 2, 4, 4)  # 30 per worker, 8 a step
    assert [m["epoch"] for m in resumed.epochs] == [1, 2]

    def timeless(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k != "seconds"}

    assert timeless(resumed.epochs[0]) == timeless(sidecar["epochs"][0])
    resumed_weights = tmp_path / "resumed.pt"
    resumed_weights.write_bytes(client.get_object(
        Bucket=s3_env, Key=resumed.checkpoint.removeprefix(f"s3://{s3_env}/"))["Body"].read())
    assert resumed.checkpoint == final_checkpoint_location(interrupted)
    assert resumed.sha256 == file_sha256(resumed_weights)
    a, b = _state(str(weights)), _state(str(resumed_weights))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from a straight run"

    # the same command once more: nothing to do, no Ray; other options on that folder: refused
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert "already done" in again.output
    assert run_finetune(straight).already_done
    with pytest.raises(FinetuneRefused, match="another fine-tuning run"):
        run_finetune(replace(straight, lr=0.05))
    assert not ray.is_initialized()


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
    with pytest.raises(FileNotFoundError, match=r"^--checkpoint .*missing\.th: no such file"):
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
