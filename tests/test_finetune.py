"""Fine-tuning of the defended forward pass: gradients, learning, checkpoints."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from support import randomize_batchnorm

from pipeline.compute.batches import load_image_folder
from scalecert import CertConfig, Certifier, create_model, load_model
from scalecert.models import save_checkpoint
from scalecert.training import (
    DefendedForward,
    FinetuneConfig,
    augment,
    finetune,
    sample_windows,
    worst_windows,
)


@pytest.mark.parametrize(("values", "field"), [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"mask_probability": 1.5}, "mask_probability"),
    ({"objective": "best-window"}, "objective"),
])
def test_invalid_settings_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FinetuneConfig(cert=CertConfig(patch_px=5), **values)


def test_only_kept_features_carry_gradient() -> None:
    """Winner-take-all: the loss gradient w.r.t. the stem output is zero off the kept set and
    inside the window's footprint."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20").train()
    cert = CertConfig(patch_px=5, top_k=0.1)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = model.relu.register_forward_hook(keep_output)
    windows = torch.tensor([[0, 0, 9, 9], [0, 0, 0, 0], [10, 10, 19, 19], [0, 0, 0, 0]])
    loss = torch.nn.functional.cross_entropy(DefendedForward(model, cert)(images, windows), labels)
    loss.backward()
    handle.remove()
    grad = captured[0].grad.abs().sum(dim=1).flatten(1)  # 4 x 1024
    kept = (grad > 0).sum(dim=1)
    assert bool((kept <= 103).all()) and bool((kept > 50).all())  # k = ceil(0.1 * 1024) = 103
    assert float(grad[0].view(32, 32)[:8, :8].sum()) == 0.0  # inside the first window's footprint


def test_sampled_windows_come_from_the_family_or_are_empty() -> None:
    boxes = torch.tensor([[0, 0, 9, 9], [5, 5, 14, 14]])
    windows = sample_windows(200, boxes, 0.5, torch.Generator().manual_seed(0))
    empty = (windows == 0).all(dim=1)
    assert 60 < int(empty.sum()) < 140
    assert all(row in boxes.tolist() for row in windows[~empty].tolist())


def test_augment_keeps_shape_and_pixels() -> None:
    images = torch.rand(6, 3, 32, 32)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, images)


@pytest.mark.slow
def test_brief_finetuning_improves_the_pruned_model_on_real_data(
    tmp_path, cifar10_test_dir, resnet20_checkpoint, shared_dir
) -> None:
    torch.set_num_threads(2)
    train_root = tmp_path / "train_subset"
    with tarfile.open(shared_dir / "data" / "cifar10" / "train.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and int(m.name[-8:-4]) < 200]
        tar.extractall(train_root, members=members, filter="data")
    train_images, train_labels = load_image_folder(train_root / "train")
    test_images, test_labels = load_image_folder(cifar10_test_dir, per_class=20)
    assert len(train_images) == 2000 and len(test_images) == 200

    cert = CertConfig(patch_px=5, top_k=0.15)
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    before = Certifier(model, cert).certify(test_images, test_labels)
    history = finetune(model, train_images, train_labels, FinetuneConfig(cert=cert, epochs=2))
    assert [m.epoch for m in history] == [1, 2] and history[1].loss < history[0].loss
    after = Certifier(model, cert).certify(test_images, test_labels)
    accuracy_before = float((before.prediction == test_labels).float().mean())
    accuracy_after = float((after.prediction == test_labels).float().mean())
    assert accuracy_after > accuracy_before + 0.05, (accuracy_before, accuracy_after)

    path = tmp_path / "finetuned.pt"
    save_checkpoint(model, path, {"finetune": json.loads(FinetuneConfig(cert=cert).to_json())})
    sidecar = json.loads((tmp_path / "finetuned.pt.json").read_text())
    assert sidecar["finetune"]["cert"]["top_k"] == 0.15
    reloaded = load_model("cifar_resnet20", checkpoint=path)
    again = Certifier(reloaded, cert).certify(test_images[:50], test_labels[:50])
    assert torch.equal(again.prediction, after.prediction[:50])
    assert torch.equal(again.certified, after.certified[:50])


def test_masking_control_trains_the_unpruned_model() -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(cert=CertConfig(patch_px=5, method="masking"), epochs=1, batch_size=8)
    history = finetune(model, images, labels, config)
    assert len(history) == 1 and history[0].images == 16
    assert not torch.equal(before["linear.weight"], model.state_dict()["linear.weight"])
    assert not model.training


@pytest.mark.parametrize("method", ["scalecert", "masking"])
def test_training_forward_is_the_certified_forward(cifar10_test_dir, resnet20_checkpoint,
                                                   method: str) -> None:
    """What fine-tuning optimises is what certification evaluates: in eval mode the training
    forward under each window of the family predicts what the certifier's full map records
    for that window, and with no window it predicts M(x)."""
    images, labels = load_image_folder(cifar10_test_dir, per_class=1)
    cert = CertConfig(patch_px=5, top_k=0.15, method=method)
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    result = Certifier(model, cert, full_map=True).certify(images, labels)
    boxes = Certifier(model, cert).mask_boxes(32)
    forward = DefendedForward(model, cert).eval()
    with torch.no_grad():
        unmasked = forward(images, torch.zeros(len(images), 4, dtype=torch.int64)).argmax(1)
        assert torch.equal(unmasked, result.prediction)
        for index, box in enumerate(boxes):
            predicted = forward(images, box.expand(len(images), 4)).argmax(1)
            assert torch.equal(predicted, result.mask_predictions[:, index]), f"window {index}"


@pytest.mark.parametrize("method", ["scalecert", "masking"])
@pytest.mark.parametrize("images_per_pass", [1, 20, 4096, None])  # 1, 3, 36 windows a pass; default
def test_the_worst_window_is_the_one_with_the_highest_loss(
    method: str, images_per_pass: int
) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("cifar_resnet20"), seed=3).train()
    cert = CertConfig(patch_px=5, method=method)
    forward = DefendedForward(model, cert).train()
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    boxes = Certifier(create_model("cifar_resnet20"), cert).mask_boxes(32)
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    worst = worst_windows(forward, images, labels, boxes, images_per_pass)
    assert forward.training  # the search ran in eval mode and gave the mode back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in statistics.items())
    forward.eval()
    with torch.no_grad():
        losses = torch.stack([torch.nn.functional.cross_entropy(
            forward(images, box.expand(6, 4)), labels, reduction="none") for box in boxes], dim=1)
    assert torch.equal(worst, boxes[losses.argmax(dim=1)])


def test_worst_window_training_runs_and_moves_the_weights() -> None:
    torch.manual_seed(1)
    model = create_model("cifar_resnet20")
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    before = model.linear.weight.detach().clone()
    config = FinetuneConfig(cert=CertConfig(patch_px=5), epochs=1, batch_size=8,
                            objective="worst-window")
    history = finetune(model, images, labels, config)
    assert len(history) == 1 and history[0].images == 16 and history[0].loss > 0
    assert not torch.equal(before, model.linear.weight)
    assert config.to_dict()["objective"] == "worst-window"
    assert "objective" not in FinetuneConfig(cert=CertConfig(patch_px=5)).to_dict()
