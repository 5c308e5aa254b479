"""Every job takes the model spec: options and their refusals, the fingerprint over the spec,
the model file, the package versions and the preprocessing, workers that follow the model's
preprocessing and refuse a changed file, the report's model line, ``scalecert models``."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from support import invoke_report, local_ray

from pipeline.analyze.config import AnalyzeRun
from pipeline.certify.driver import CERTIFY
from pipeline.certify.worker import CertifyWorker
from pipeline.cli import main
from pipeline.compute.batches import to_batch
from pipeline.compute.models import model_fingerprint_fields
from pipeline.io.certificates import part_location
from pipeline.io.images import Preprocess, decode
from pipeline.io.sources import open_dataset
from pipeline.report.thumbnails import run_preprocess
from pipeline.run.config import RunConfig
from pipeline.run.plan import RunRefused, make_plan, prepare_output
from pipeline.train.config import FinetuneRun
from pipeline.train.trainer import _manifest, final_checkpoint_location
from scalecert import CertConfig, Certifier
from scalecert.errors import InvalidOption, ModelChanged
from scalecert.models import Preprocessing, load_model

# Third-party style: functional ReLUs, normalisation left to the data loader; fixed weights.
MODEL_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make():
    torch.manual_seed(7)
    return Net()
'''
MEAN, STD = "0.5,0.5,0.5", "0.25,0.25,0.25"
SIDE, RESIZE = 40, 48
USER = {"input_size": SIDE, "resize": RESIZE, "interpolation": "bicubic", "mean": MEAN,
        "std": STD}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "net.py"
    path.parent.mkdir()
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three classes of two random 'photos' of odd sizes (resized and cropped to 40 px)."""
    generator = np.random.default_rng(5)
    root = tmp_path / "photos"
    for label, name in enumerate(("ant", "bee", "cat")):
        (root / name).mkdir(parents=True)
        for index, size in enumerate(((60, 50), (52, 70))):
            pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def _run(model_file: Path, data: Path, out: Path, **changes: object) -> RunConfig:
    values = {"data": str(data), "model": f"file:{model_file}:make", "out": str(out),
              "patches": ("8",), "methods": ("scalecert", "masking"), "device": "cpu",
              "shard_size": 4, **USER, **changes}
    return RunConfig(**values)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"model": "hub:resnet"}, r"^--model: 'hub:resnet': unknown form 'hub:'"),
    ({"model": "file:net.py"}, r"^--model: 'file:net.py': expected file:PATH\.py:CALLABLE"),
    ({"model": "vgg"}, r"^--model: unknown model 'vgg'; built-ins: .*; or a spec: file:"),
    ({"input_size": 4}, r"^--input-size: expected an integer >= 8"),
    ({"resize": 30}, r"^--resize: expected an integer >= 40"),
    ({"interpolation": "lanczos"}, r"^--interpolation: expected one of bilinear, bicubic"),
    ({"mean": "0.5,0.5"}, r"^--mean: expected three numbers R,G,B"),
    ({"std": "0.2,-1,0.2"}, r"^--std: expected three numbers > 0"),
    ({"std": None}, r"^--std: model .* needs a std with its mean"),
    ({"input_size": None, "resize": None},
     r"^--input-size: model file:net\.py:make declares no input size; declare its "
     r"preprocessing: --input-size N"),
])
def test_run_options_refuse_bad_models_and_preprocessing(change: dict, message: str) -> None:
    values = {"data": "d", "model": "file:net.py:make", "out": "o", "patches": ("2%",), **USER,
              **change}
    with pytest.raises(InvalidOption, match=message):
        RunConfig(**values)


def test_builtins_refuse_mean_and_std_in_every_job() -> None:
    base = {"data": "d", "model": "cifar_resnet20", "out": "o"}
    with pytest.raises(InvalidOption, match=r"^--mean: built-in model cifar_resnet20 "
                                            r"normalises inside its own first stage"):
        RunConfig(**base, patches=("2%",), mean=MEAN, std=STD)
    with pytest.raises(InvalidOption, match=r"^--std: built-in model"):
        FinetuneRun(**base, patch="2%", std=STD)


def test_the_same_keys_in_yaml_flags_and_python(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: d\nmodel: file:net.py:make\nout: o\npatch: 2%\ninput-size: 40\n"
                      "resize: 48\ninterpolation: bicubic\nmean: [0.5, 0.5, 0.5]\n"
                      "std: 0.25,0.25,0.25\n")
    run = RunConfig.from_sources(config, {"resize": 56})
    assert (run.input_size, run.resize, run.interpolation) == (40, 56, "bicubic")
    assert run.mean == (0.5, 0.5, 0.5) and run.std == (0.25, 0.25, 0.25)
    assert run.preprocessing() == Preprocessing(40, 56, "bicubic", (0.5,) * 3, (0.25,) * 3)
    analysis = AnalyzeRun.from_sources(config, {})
    assert analysis.run.preprocessing() == Preprocessing(40, 48, "bicubic", (0.5,) * 3,
                                                         (0.25,) * 3)
    finetune = FinetuneRun(data="d", model="file:models/net.py:make", out="o", patch="2%",
                           **USER)
    assert finetune.mean == (0.5, 0.5, 0.5)
    assert "--input-size 40 --resize 48 --interpolation bicubic --mean 0.5,0.5,0.5 --std " \
           "0.25,0.25,0.25" in finetune.command_line()
    assert final_checkpoint_location(finetune) == "o/net-make-scalecert.pt"
    with pytest.raises(InvalidOption, match=r"^--model: expected a model that can train: an "
                                            r"exported program \(export:\) is fixed in eval"):
        FinetuneRun(data="d", model="export:net.pt2", out="o", patch="2%", input_size=32)


def test_undeclared_preprocessing_stays_out_of_the_fingerprint() -> None:
    """Runs of built-ins planned before preprocessing options existed keep resuming."""
    plain = RunConfig(data="d", model="cifar_resnet20", out="o", patches=("2%",))
    assert not set(plain.fingerprint_fields()) & set(USER)
    assert model_fingerprint_fields("cifar_resnet20", load_model("cifar_resnet20")) == {}
    sized = RunConfig(data="d", model="cifar_resnet20", out="o", patches=("2%",), input_size=40)
    assert sized.fingerprint_fields()["input_size"] == 40
    finetune = FinetuneRun(data="d", model="cifar_resnet20", out="o", patch="2%")
    assert not set(finetune.fingerprint_fields()) & set(USER)


# -- the plan and its fingerprint ------------------------------------------------------------


def test_fingerprint_covers_the_file_the_preprocessing_and_the_packages(
    tmp_path: Path, model_file: Path, photos: Path
) -> None:
    run = _run(model_file, photos, tmp_path / "out")
    plan = make_plan(run, CERTIFY)
    assert plan.image_side == SIDE and plan.num_classes == 3
    assert plan.preprocessing == Preprocessing(SIDE, RESIZE, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert plan.source_sha256 is not None
    assert plan.package_versions == {"torch": importlib.metadata.version("torch")}
    assert prepare_output(plan) == [0, 1]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source_sha256"] == plan.source_sha256
    assert manifest["preprocessing"]["interpolation"] == "bicubic"
    assert manifest["config"]["model"] == f"file:{model_file}:make"
    # the same inputs, the same run
    assert make_plan(run, CERTIFY).fingerprint == plan.fingerprint

    # the preprocessing declared differently: another run
    assert make_plan(_run(model_file, photos, tmp_path / "out",
                          interpolation="bilinear"), CERTIFY).fingerprint != plan.fingerprint
    # the model file's bytes changed: another run, and resume is refused
    model_file.write_text(MODEL_FILE.replace("manual_seed(7)", "manual_seed(8)"))
    changed = make_plan(run, CERTIFY)
    assert changed.fingerprint != plan.fingerprint
    assert changed.source_sha256 != plan.source_sha256
    with pytest.raises(RunRefused, match="different configuration, model or data"):
        prepare_output(changed)

    class Packaged:  # a module: or timm: model as the fingerprint sees it
        source_sha256 = None
        preprocessing = plan.preprocessing
        package_versions = {"timm": "1.0.3"}

    old = model_fingerprint_fields("timm:resnet18", Packaged())
    Packaged.package_versions = {"timm": "1.0.9"}
    assert model_fingerprint_fields("timm:resnet18", Packaged()) != old
    assert old["package_versions"] == {"timm": "1.0.3"} and "preprocessing" in old


def test_plan_refuses_bad_models_before_any_work(tmp_path: Path, model_file: Path,
                                                 photos: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidOption, match=r"^--model: 'file:.*missing\.py:make': no such file"):
        make_plan(_run(tmp_path / "missing.py", photos, out), CERTIFY)
    with pytest.raises(InvalidOption, match=r"^--model: .*no callable 'build'"):
        make_plan(_run(model_file, photos, out, model=f"file:{model_file}:build"), CERTIFY)
    with pytest.raises(InvalidOption, match=r"^--layer: layer nope"):
        make_plan(_run(model_file, photos, out, layer="nope"), CERTIFY)
    weights = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, weights)
    with pytest.raises(InvalidOption, match=r"^--checkpoint: .*other\.pt does not match model "
                                            r"file:.*missing: "):
        make_plan(_run(model_file, photos, out, checkpoint=str(weights)), CERTIFY)
    assert not out.exists()


# -- workers ---------------------------------------------------------------------------------


def _worker(plan, **changes) -> CertifyWorker:
    return CertifyWorker(replace(plan.worker_settings(), **changes))


def test_worker_follows_the_models_preprocessing(tmp_path: Path, model_file: Path,
                                                 photos: Path) -> None:
    plan = make_plan(_run(model_file, photos, tmp_path / "out"), CERTIFY)
    summary = _worker(plan).run(plan.task(0))
    assert summary.errors == 0 and summary.rows == 2 * 4
    rows = pq.read_table(part_location(str(tmp_path / "out"), 0)).to_pylist()

    # the library on images resized (short side 48, bicubic), cropped to 40 px, normalised
    # inside the model: the same certificates
    preprocess = Preprocess("resize", SIDE, RESIZE, "bicubic")
    records = open_dataset(str(photos)).records[:4]
    images = to_batch([decode(Path(r.location).read_bytes(), preprocess) for r in records])
    labels = torch.tensor([r.label for r in records])
    model = load_model(f"file:{model_file}:make", preprocessing=plan.preprocessing)
    for method in ("scalecert", "masking"):
        direct = Certifier(model, CertConfig(patch_px=8, method=method), full_map=False
                           ).certify(images, labels)
        got = {r["image_id"]: r for r in rows if r["method"] == method}
        ids = [r.image_id for r in records]
        assert [got[i]["prediction"] for i in ids] == direct.prediction.tolist(), method
        assert [got[i]["certified"] for i in ids] == direct.certified.tolist(), method
        assert [got[i]["clean_output"] for i in ids] == direct.clean_output.tolist(), method


def test_worker_refuses_a_model_file_changed_since_the_plan(tmp_path: Path, model_file: Path,
                                                            photos: Path) -> None:
    plan = make_plan(_run(model_file, photos, tmp_path / "out"), CERTIFY)
    model_file.write_text(MODEL_FILE + "\n# edited after the plan\n")
    with pytest.raises(ModelChanged) as caught:
        _worker(plan).run(plan.task(0))
    assert str(model_file) in str(caught.value) and plan.source_sha256 in str(caught.value)
    model_file.write_text(MODEL_FILE)
    with pytest.raises(ModelChanged, match=r"packages it imports differ"):
        _worker(plan, package_versions={"torch": "0.0"}).run(plan.task(0))
    assert not (tmp_path / "out" / "certificates").exists()


def test_finetune_fingerprint_covers_the_file(tmp_path: Path, model_file: Path,
                                              photos: Path) -> None:
    run = FinetuneRun(data=str(photos), model=f"file:{model_file}:make", out="o", patch="8",
                      **USER)
    dataset = open_dataset(str(photos))
    first = _manifest(run, dataset, load_model(run.model, preprocessing=run.preprocessing()))
    assert first["preprocessing"]["resize"] == RESIZE and first["source_sha256"]
    model_file.write_text(MODEL_FILE + "\n# edited\n")
    second = _manifest(run, dataset, load_model(run.model, preprocessing=run.preprocessing()))
    assert second["fingerprint"] != first["fingerprint"]


def test_export_program_and_checkpoint_from_s3(s3_env: str, s3_server, tmp_path: Path,
                                               model_file: Path) -> None:
    import boto3

    from pipeline.compute.models import load_stored_model
    from pipeline.io.storage import S3Options

    net = load_model(f"file:{model_file}:make", preprocessing=Preprocessing(SIDE)).network.eval()
    program = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, SIDE, SIDE),), dynamic_shapes={
        "x": {0: torch.export.Dim("batch")}}), program)
    weights = tmp_path / "net.pt"
    torch.save(net.state_dict(), weights)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_env, Key="models/net.pt2", Body=program.read_bytes())
    client.put_object(Bucket=s3_env, Key="models/net.pt", Body=weights.read_bytes())
    s3 = S3Options(endpoint=s3_server.endpoint)
    spec = f"export:s3://{s3_env}/models/net.pt2"
    declared = Preprocessing(SIDE, mean=(0.5,) * 3, std=(0.25,) * 3)
    model = load_stored_model(spec, f"s3://{s3_env}/models/net.pt", s3, preprocessing=declared)
    assert model.name == spec and model.num_classes == 3
    planned = model.source_sha256
    x = torch.rand(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - 0.5) / 0.25), atol=1e-6)

    client.put_object(Bucket=s3_env, Key="models/net.pt2", Body=program.read_bytes() + b" ")
    with pytest.raises(ModelChanged, match=rf"^model: s3://{s3_env}/models/net\.pt2 changed "
                                           rf"since the run was planned.*{planned}"):
        load_stored_model(spec, None, s3, preprocessing=declared, expect_source_sha256=planned)
    with pytest.raises(FileNotFoundError, match=rf"^model: s3://{s3_env}/models/gone\.pt2: no "
                                                r"such file"):
        load_stored_model(f"export:s3://{s3_env}/models/gone.pt2", None, s3,
                          preprocessing=declared)


# -- images ----------------------------------------------------------------------------------


def test_preprocess_follows_any_declared_preprocessing() -> None:
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    buffer = __import__("io").BytesIO()
    photo.save(buffer, format="PNG")
    data = buffer.getvalue()
    declared = Preprocessing(64, 72, "bicubic")
    assert Preprocess.of(declared) == Preprocess("resize", 64, 72, "bicubic")
    assert Preprocess.of(Preprocessing(96)) == Preprocess("exact", 96)
    out = decode(data, Preprocess.of(declared))
    # torchvision's arithmetic: short side 90 -> 72, long 120 -> 96, crop offsets 16 and 4
    expected = np.array(photo.resize((96, 72), Image.Resampling.BICUBIC).crop((16, 4, 80, 68)))
    assert out.shape == (64, 64, 3) and np.array_equal(out, expected)
    bilinear = decode(data, Preprocess("resize", 64, 72, "bilinear"))
    assert not np.array_equal(out, bilinear)
    with pytest.raises(InvalidOption, match="interpolation 'nearest'"):
        Preprocess("resize", 64, 72, "nearest")
    assert Preprocess("imagenet", 224, 256) == Preprocess("resize", 224, 256)  # earlier name


def test_thumbnails_decode_as_the_run_did() -> None:
    assert run_preprocess({"image_side": 40, "preprocessing": {
        "input_size": 40, "resize": 48, "interpolation": "bicubic"}}) == Preprocess(
            "resize", 40, 48, "bicubic")
    assert run_preprocess({"image_side": 32, "preprocessing": {"input_size": 32}}) == \
        Preprocess("exact", 32)
    assert run_preprocess({"image_side": 224}) == Preprocess("resize", 224, 256)  # older runs


# -- the command line ------------------------------------------------------------------------


def test_models_command_lists_builtins_then_forms() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[:7] == ["cifar_resnet18", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
                         "cifar_resnet56", "resnet18", "resnet50"]
    for form in ("file:PATH.py:CALLABLE", "module:IMPORT.PATH:CALLABLE", "export:PATH.pt2",
                 "torchvision:NAME", "timm:NAME"):
        assert any(line.strip().startswith(form) for line in lines[7:]), form


@pytest.mark.parametrize("command", ["certify", "attack", "analyze", "finetune"])
def test_every_job_takes_the_spec_and_its_preprocessing(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    for flag in ("--model", "file:PATH.py:CALLABLE", "--input-size", "--resize",
                 "--interpolation", "--mean", "--std"):
        assert flag in result.output, (command, flag)


def test_cli_refuses_a_user_model_without_input_size(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["certify", "--data", str(tmp_path), "--model",
                                       "file:net.py:make", "--patch", "2%", "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--input-size: model file:net.py:make declares no input size" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_certify_a_file_spec_through_ray_then_report(tmp_path: Path, model_file: Path,
                                                     photos: Path) -> None:
    out = tmp_path / "run"
    args = ["certify", "--quiet", "--data", str(photos), "--model", f"file:{model_file}:make",
            "--input-size", str(SIDE), "--resize", str(RESIZE), "--interpolation", "bicubic",
            "--mean", MEAN, "--std", STD, "--patch", "8", "--method", "masking",
            "--out", str(out), "--workers", "1"]
    with local_ray("specs"):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output + repr(result.exception)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["image_side"] == SIDE and manifest["preprocessing"]["resize"] == RESIZE
        rows = pq.read_table(out / "certificates" / "part-00000.parquet").to_pylist()
        assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
        model_file.write_text(MODEL_FILE + "\n# edited\n")
        again = CliRunner().invoke(main, args)
        assert again.exit_code == 1 and "different configuration, model or data" in again.output
    code, output = invoke_report(str(out), "--thumbnails", "2")
    assert code == 0, output
    markdown = (out / "report.md").read_text()
    assert f"model `file:{model_file}:make`" in markdown and "file sha256" in markdown
    assert "preprocessing 40 px from short side 48 (bicubic), centre crop" in markdown
