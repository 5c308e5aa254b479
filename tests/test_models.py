"""Model registry, stage splits, state_dict layouts and checkpoint I/O."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import randomize_batchnorm
from torch import nn

from scalecert.models import (
    StagedClassifier,
    available_models,
    create_model,
    file_sha256,
    load_model,
    save_checkpoint,
)

AKAMASTER_RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"
IMAGENET_MODELS = ("resnet18", "resnet50")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")





def test_available_models_sorted_and_complete() -> None:
    assert available_models() == (
        "cifar_resnet18",
        "cifar_resnet20",
        "cifar_resnet32",
        "cifar_resnet44",
        "cifar_resnet56",
        "resnet18",
        "resnet50",
    )


@pytest.mark.parametrize("name", available_models())
def test_builds_and_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert isinstance(model, StagedClassifier)
    assert model.name == name and model.checkpoint_sha256 is None
    names = [stage for stage, _ in model.stages()]
    assert names[0] == "normalize" and names[-2] == "pool"
    assert set(model.superficial_layers) <= set(names)
    batch = 1 if name == "resnet50" else 2
    x = torch.rand(batch, 3, model.input_size, model.input_size)
    with torch.no_grad():
        logits = model(x)
    expected_classes = 1000 if name in IMAGENET_MODELS else 10
    assert model.num_classes == expected_classes
    assert logits.shape == (batch, expected_classes)
    assert torch.isfinite(logits).all()


def test_num_classes_override() -> None:
    model = create_model("cifar_resnet20", num_classes=7)
    assert model.num_classes == 7 and model.linear.out_features == 7


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        (name, layer)
        for name in available_models()
        for layer in create_model(name).superficial_layers
    ],
)
def test_head_of_stem_is_the_model(name: str, layer: str) -> None:
    torch.manual_seed(1)
    model = randomize_batchnorm(create_model(name), seed=1, spread=0.1).eval()
    side = 32 if model.input_size == 32 else 64  # ImageNet models at a reduced side: fast
    x = torch.rand(2, 3, side, side)
    split = model.split(layer)
    assert split.layer == layer
    with torch.no_grad():
        features = split.stem(x)
        logits = split.head(features)
        expected = model(x)
    assert features.ndim == 4 and (features >= 0).all(), "a superficial layer follows a ReLU"
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
    # The split shares the model's modules: no copies of the weights.
    assert {id(p) for p in split.stem.parameters()} <= {id(p) for p in model.parameters()}


def test_default_layer_is_first_superficial_layer() -> None:
    assert create_model("cifar_resnet20").split().layer == "relu"
    assert create_model("resnet18").split().layer == "relu"


def test_unknown_layer_is_named() -> None:
    with pytest.raises(ValueError, match=r"layer:.*'layer9'.*relu, layer1, layer2"):
        create_model("cifar_resnet20").split("layer9")


def test_cifar_resnet20_keys_match_akamaster(resnet20_checkpoint: Path) -> None:
    stored = torch.load(resnet20_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    stored = {k.removeprefix("module."): v.shape for k, v in stored.items()}
    ours = {
        k: v.shape
        for k, v in create_model("cifar_resnet20").state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert ours == stored


def torchvision_resnet_keys(bottleneck: bool, blocks: tuple[int, ...]) -> set[str]:
    """torchvision's ResNet state_dict keys, written out from its source layout."""
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in BN_KEYS}
    convs = 3 if bottleneck else 2
    for stage, count in enumerate(blocks, start=1):
        for i in range(count):
            prefix = f"layer{stage}.{i}"
            for j in range(1, convs + 1):
                keys.add(f"{prefix}.conv{j}.weight")
                keys |= {f"{prefix}.bn{j}.{k}" for k in BN_KEYS}
            # The first block changes shape in every stage except ResNet-18's layer1.
            if i == 0 and (bottleneck or stage > 1):
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{k}" for k in BN_KEYS}
    return keys


def test_resnet18_state_dict_matches_torchvision() -> None:
    state = create_model("resnet18").state_dict()
    # 1 + 5 (stem) + 8 blocks x 12 + 3 downsamples x 6 + 2 (fc) = 122
    assert len(state) == 122
    assert set(state) == torchvision_resnet_keys(False, (2, 2, 2, 2))
    assert "layer1.0.downsample.0.weight" not in state
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer2.0.downsample.1.running_var"].shape == (128,)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["fc.weight"].shape == (1000, 512)


def test_resnet50_state_dict_matches_torchvision() -> None:
    model = create_model("resnet50")
    state = model.state_dict()
    # 6 (stem) + 16 blocks x 18 + 4 downsamples x 6 + 2 (fc) = 320
    assert len(state) == 320
    assert set(state) == torchvision_resnet_keys(True, (3, 4, 6, 3))
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.downsample.1.running_var"].shape == (512,)
    assert state["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)
    # torchvision v1.5: the stride sits on the 3x3 conv of the first block of a stage.
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("wrap", ["plain", "module_state_dict", "model"])
def test_save_and_load_round_trip(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(2)
    model = randomize_batchnorm(create_model("cifar_resnet20", num_classes=7), seed=2, spread=0.1).eval()
    x = torch.rand(3, 3, 32, 32)
    path = tmp_path / "model.pt"
    sha = save_checkpoint(model, path, {"epoch": 3, "note": "round trip"})
    assert sha == file_sha256(path)
    assert json.loads(Path(f"{path}.json").read_text()) == {"epoch": 3, "note": "round trip"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    if wrap != "plain":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if wrap == "module_state_dict":
            obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
        else:
            obj = {"model": state}
        path = tmp_path / f"{wrap}.pt"
        torch.save(obj, path)
        sha = file_sha256(path)
    loaded = load_model("cifar_resnet20", path)  # num_classes inferred from linear.weight
    assert not loaded.training
    assert loaded.num_classes == 7
    assert loaded.checkpoint_sha256 == sha
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_save_without_metadata_writes_no_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(create_model("cifar_resnet20"), path, None)
    assert path.is_file() and not Path(f"{path}.json").exists()
    assert load_model("cifar_resnet20").checkpoint_sha256 is None


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path) -> None:
    model = randomize_batchnorm(create_model("cifar_resnet20"), seed=3, spread=0.1).eval()
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "m.pt")
    x = torch.rand(1, 3, 32, 32)
    loaded = load_model("cifar_resnet20", tmp_path / "m.pt")
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match=r"^model: .*'resnet101'.*cifar_resnet20.*resnet50"):
        create_model("resnet101")
    with pytest.raises(ValueError, match="model: "):
        load_model("resnet101")


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model("cifar_resnet20", path)


def test_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_model("cifar_resnet20", path)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="list.pt.*no state_dict"):
        load_model("cifar_resnet20", listing)


def test_wrong_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    save_checkpoint(create_model("cifar_resnet20"), path, None)
    with pytest.raises(ValueError, match=r"r20\.pt.*cifar_resnet32.*missing: layer1\.3\."):
        load_model("cifar_resnet32", path)
    with pytest.raises(ValueError, match=r"r20\.pt.*unexpected: layer1\.2\.") as info:
        load_model("cifar_resnet18", path)
    assert "mis-shaped: bn1." in str(info.value)
    assert "conv1.weight (checkpoint (16, 3, 3, 3), model (64, 3, 3, 3))" in str(info.value)
    with pytest.raises(ValueError, match=r"mis-shaped: linear\.bias"):
        load_model("cifar_resnet20", path, num_classes=100)


def test_load_akamaster_resnet20(resnet20_checkpoint: Path) -> None:
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    assert model.checkpoint_sha256 == AKAMASTER_RESNET20_SHA256
    assert file_sha256(resnet20_checkpoint) == AKAMASTER_RESNET20_SHA256
    assert model.num_classes == 10 and not model.training
    stored = torch.load(resnet20_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.layer3[2].bn2.running_var, stored["module.layer3.2.bn2.running_var"])
