"""Run options: patch sizes, YAML with flag overrides, validation before any work."""

from __future__ import annotations

import pickle
from dataclasses import fields, replace
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pipeline.analyze.config import AnalyzeRun
from pipeline.attack.config import AttackOptions, AttackRun
from pipeline.cli import main
from pipeline.options import PatchSize
from pipeline.run.config import RunConfig
from pipeline.train.config import FinetuneRun
from scalecert.attacks import AttackConfig
from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.training import FinetuneConfig

BASE = {"data": "images/", "model": "cifar_resnet20", "out": "runs/x", "patches": ("2.4%",)}


@pytest.mark.parametrize(("text", "side", "pixels"), [
    ("1%", 224, 23), ("2%", 224, 32), ("3%", 224, 39),
    ("0.4%", 32, 2), ("2.4%", 32, 5), ("32", 224, 32), ("5px", 32, 5),
])
def test_patch_sizes_follow_the_literature(text: str, side: int, pixels: int) -> None:
    assert PatchSize.parse(text).pixels(side) == pixels


@pytest.mark.parametrize("text", ["", "abc", "0", "2.5", "150%", "-3", "0%"])
def test_bad_patch_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="patch"):
        PatchSize.parse(text)


@pytest.mark.parametrize(("change", "flag"), [
    ({"model": "vgg"}, "model"),
    ({"patches": ()}, "--patch"),
    ({"patches": ("2%", "2%")}, "--patch"),
    ({"methods": ("scalecert", "patchguard")}, "--method"),
    ({"top_k": 0.0}, "--top-k"),
    ({"r": 0}, "--r"),
    ({"masks_per_axis": 0}, "--masks-per-axis"),
    ({"shard_size": 0}, "--shard-size"),
    ({"limit": -1}, "--limit"),
    ({"workers": 0}, "--workers"),
    ({"device": "tpu"}, "--device"),
    ({"margin": -1.0}, "--margin"),
])
def test_invalid_options_name_the_flag(change: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        RunConfig(**{**BASE, **change})


def test_yaml_with_flags_overriding(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: images/\nmodel: cifar_resnet20\nout: runs/a\npatch: [2.4%, 0.4%]\n"
                    "top-k: 0.2\nshard_size: 64\n")
    run = RunConfig.from_sources(path, {"top_k": 0.1, "out": "runs/b", "limit": None})
    assert run.patches == ("2.4%", "0.4%") and run.top_k == 0.1 and run.shard_size == 64
    assert run.out == "runs/b" and run.patch_pixels(32) == (5, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("data: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("dataa: x\n", "unknown option 'dataa'"),
])
def test_bad_yaml_is_refused_with_the_file_named(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        RunConfig.from_sources(path, {})


def test_missing_required_options_are_listed() -> None:
    with pytest.raises(ValueError, match="--data, --out"):
        RunConfig.from_sources(None, {"model": "cifar_resnet20", "patches": ("2%",)})


def test_fingerprint_ignores_cluster_shape() -> None:
    a = RunConfig(**BASE, workers=1, batch_size=64, address=None)
    b = RunConfig(**BASE, workers=4, batch_size=256, address="auto", resume=False)
    c = RunConfig(**{**BASE, "top_k": 0.2})
    assert a.fingerprint_fields() == b.fingerprint_fields()
    assert a.fingerprint_fields() != c.fingerprint_fields()


# --- one form: defaults, reading, the patch --------------------------------------------------

LIBRARY = CertConfig(patch_px=1)  # the library's certification defaults
JOBS = ("certify", "attack", "analyze", "finetune")


def help_of(command: str, flag: str) -> str:
    """The help text that ``scalecert COMMAND --help`` prints for ``flag``."""
    cli = main.commands[command]
    for param in cli.params:
        if flag in getattr(param, "opts", ()):
            return " ".join(param.get_help_record(click.Context(cli))[1].split())
    raise AssertionError(f"{command} has no {flag}")


@pytest.mark.parametrize("command", JOBS)
def test_the_help_shows_the_librarys_certification_defaults(command: str) -> None:
    assert f"({LIBRARY.top_k:g})" in help_of(command, "--top-k")
    assert f"({LIBRARY.masks_per_axis}" in help_of(command, "--masks-per-axis")
    assert LIBRARY.method in help_of(command, "--method")
    if command != "analyze":
        assert f"({LIBRARY.r})" in help_of(command, "--r")
    if command in ("certify", "attack"):
        assert f"({LIBRARY.margin:g})" in help_of(command, "--margin")
        assert f"Default: {LIBRARY.vote}" in help_of(command, "--vote")
    printed = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
    assert f"({LIBRARY.top_k:g})" in printed


def test_every_jobs_certification_defaults_are_the_librarys() -> None:
    for options in (RunConfig, FinetuneRun):
        shared = [f for f in fields(CertConfig) if hasattr(options, f.name)]
        assert {f.name for f in shared} >= {"top_k", "masks_per_axis", "r", "layer"}
        for item in shared:
            assert getattr(options, item.name) == getattr(LIBRARY, item.name), item.name
    assert RunConfig.methods == (LIBRARY.method,) and FinetuneRun.method == LIBRARY.method
    run = AnalyzeRun.from_sources(None, {"data": "d", "model": "cifar_resnet20", "out": "o",
                                         "patch": "5"})
    assert run.run.cert_config(5, run.method) == CertConfig(patch_px=5)


def test_the_training_and_attack_defaults_in_the_help_are_the_librarys() -> None:
    training = FinetuneConfig(cert=LIBRARY)
    assert f"({training.lr:g})" in help_of("finetune", "--lr")
    assert f"({training.weight_decay:g})" in help_of("finetune", "--weight-decay")
    assert f"({training.batch_size})" in help_of("finetune", "--batch-size")
    assert f"Default: {training.objective}" in help_of("finetune", "--objective")
    attack = AttackConfig(patch_px=1)
    for command in ("attack", "analyze"):
        assert f"({attack.steps})" in help_of(command, "--steps")
        assert f"({attack.step_size:g})" in help_of(command, "--step-size")
        assert f"(default {attack.location})" in help_of(command, "--location")
    assert "(default: undefended" in help_of("analyze", "--attack-model")
    assert "(default: defended)" in help_of("attack", "--attack-model")
    assert ", ".join(f"{a:g}" for a in AnalyzeRun.alphas) in help_of("analyze", "--alpha")


def test_the_help_reads_each_default_where_it_is_defined(monkeypatch) -> None:
    """Nothing in the command line repeats a default: change it where it lives and the help
    follows."""
    monkeypatch.setattr(RunConfig, "top_k", 0.25)
    monkeypatch.setattr(RunConfig, "shard_size", 99)
    monkeypatch.setattr(FinetuneRun, "epochs", 7)
    monkeypatch.setattr(AttackOptions, "steps", 13)
    assert "(0.25)" in help_of("certify", "--top-k") and "(0.25)" in help_of("analyze", "--top-k")
    assert "(99)" in help_of("attack", "--shard-size")
    assert "(7)" in help_of("finetune", "--epochs")
    assert "(13)" in help_of("attack", "--steps")


CERTIFY_FLAGS = [
    "--data", "images/", "--model", "cifar_resnet20", "--out", "runs/a", "--patch", "2.4%",
    "--patch", "0.4%", "--method", "masking", "--method", "scalecert", "--top-k", "0.2",
    "--masks-per-axis", "5", "--margin", "0.01", "--full-map", "--shard-size", "64",
    "--limit", "7", "--no-resume", "--device", "cpu", "--batch-size", "32", "--precision",
    "fp32", "--no-compile", "--window-layout", "patchcleanser",
]
CERTIFY_YAML = """\
data: images/
model: cifar_resnet20
out: runs/a
patch: [2.4%, 0.4%]
method: [masking, scalecert]
top-k: 0.2
masks_per_axis: 5
margin: 0.01
full-map: true
shard_size: 64
limit: 7
resume: false
device: cpu
batch-size: 32
precision: fp32
compile: false
window-layout: patchcleanser
"""
JOB_FLAGS = {
    "certify": CERTIFY_FLAGS,
    "attack": [*CERTIFY_FLAGS, "--attack", "adaptive", "--alpha", "2", "--steps", "3",
               "--attack-model", "undefended", "--location", "random", "--seed", "4"],
    "analyze": ["--data", "images/", "--model", "cifar_resnet20", "--out", "runs/a",
                "--patch", "5", "--method", "masking", "--top-k", "0.3", "--images", "20",
                "--alpha", "0", "--alpha", "3", "--steps", "2", "--attack-model", "defended"],
    "finetune": ["--data", "images/", "--model", "cifar_resnet20", "--out", "runs/a",
                 "--patch", "2.4%", "--method", "masking", "--top-k", "0.3", "--epochs", "2",
                 "--lr", "0.05", "--no-augment", "--objective", "worst-window",
                 "--workers", "2"],
}
JOB_YAML = {
    "certify": CERTIFY_YAML,
    "attack": CERTIFY_YAML + "attack: adaptive\nalpha: 2.0\nsteps: 3\n"
                             "attack-model: undefended\nlocation: random\nseed: 4\n",
    "analyze": "data: images/\nmodel: cifar_resnet20\nout: runs/a\npatch: 5\nmethod: masking\n"
               "top_k: 0.3\nimages: 20\nalpha: [0, 3]\nsteps: 2\nattack_model: defended\n",
    "finetune": "data: images/\nmodel: cifar_resnet20\nout: runs/a\npatch: 2.4%\n"
                "method: masking\ntop-k: 0.3\nepochs: 2\nlr: 0.05\naugment: false\n"
                "objective: worst-window\nworkers: 2\n",
}


class Captured(Exception):
    """Stops a command where its work would start, holding the options it was given."""


def options_of(monkeypatch: pytest.MonkeyPatch, command: str, args: list[str]) -> Any:
    """The options object ``scalecert COMMAND ARGS`` would run with (no work is done)."""
    import pipeline.cli as cli
    import pipeline.analyze.driver as analyze
    import pipeline.attack.driver as attack_driver
    import pipeline.train.trainer as trainer

    def capture(run: Any, *args: Any, **kwargs: Any) -> None:
        raise Captured(run)

    monkeypatch.setattr(cli, "_run_and_report", capture)
    monkeypatch.setattr(attack_driver, "run_attack", capture)
    monkeypatch.setattr(analyze, "run_analysis", capture)
    monkeypatch.setattr(trainer, "run_finetune", capture)
    result = CliRunner().invoke(main, [command, *args])
    assert isinstance(result.exception, Captured), result.output
    return result.exception.args[0]


@pytest.mark.parametrize("command", JOBS)
def test_a_yaml_file_and_flags_give_the_same_options(tmp_path, monkeypatch, command) -> None:
    config = tmp_path / "options.yaml"
    config.write_text(JOB_YAML[command])
    from_flags = options_of(monkeypatch, command, JOB_FLAGS[command])
    from_yaml = options_of(monkeypatch, command, ["--config", str(config)])
    assert from_flags == from_yaml
    # and flags over the file win, the rest of the file kept
    over = options_of(monkeypatch, command, ["--config", str(config), "--out", "runs/b"])
    run = getattr(over, "run", over)
    assert run.out == "runs/b" and over == replace_out(from_yaml, "runs/b")


def replace_out(options: Any, out: str) -> Any:
    if hasattr(options, "run"):
        return replace(options, run=replace(options.run, out=out))
    return replace(options, out=out)


def test_every_job_reads_its_options_one_way(tmp_path) -> None:
    """The same refusals from every job: unknown keys, missing options by flag, a single value
    of a repeatable option."""
    flags = {"data": "d", "model": "cifar_resnet20", "out": "o"}
    for job, patch in ((RunConfig, "patches"), (AttackRun, "patches"), (AnalyzeRun, "patch"),
                       (FinetuneRun, "patch")):
        with pytest.raises(InvalidOption, match="missing required option"):
            job.from_sources(None, {"model": "cifar_resnet20"})
        with pytest.raises(InvalidOption, match="unknown option"):
            job.from_sources(None, {**flags, patch: "5", "bogus": 1})
        bad = tmp_path / f"{job.__name__}.yaml"
        bad.write_text("data: d\nmodel: cifar_resnet20\nout: o\npatch: 5\nbogus: 1\n")
        with pytest.raises(InvalidOption, match="unknown option 'bogus'"):
            job.from_sources(bad, {})
    # a flag not given is None, a repeatable one (); one value of a repeatable one is a tuple
    run = RunConfig.from_sources(None, {**flags, "patches": "5", "methods": (), "top_k": None})
    assert run.patches == ("5",) and run.methods == (LIBRARY.method,)
    assert run.top_k == LIBRARY.top_k


@pytest.mark.parametrize("command", JOBS)
def test_a_bad_certification_setting_is_refused_alike_by_every_job(tmp_path, command) -> None:
    args = ["--data", str(tmp_path), "--model", "cifar_resnet20", "--out",
            str(tmp_path / "out"), "--patch", "5", "--top-k", "2"]
    result = CliRunner().invoke(main, [command, *args])
    assert result.exit_code == 2, result.output
    assert "--top-k: must be in (0, 1], got 2.0" in result.output
    assert not (tmp_path / "out").exists()


def test_each_patch_is_parsed_once(monkeypatch) -> None:
    """Each job parses its patch sizes once, when its options are validated: the pixels on
    any image side, the library configs and a copy sent to a worker use that parse."""
    parsed: list[str] = []
    parse = PatchSize.parse.__func__  # type: ignore[attr-defined]

    def counting(cls: type, text: Any) -> PatchSize:
        parsed.append(str(text))
        return parse(cls, text)

    monkeypatch.setattr(PatchSize, "parse", classmethod(counting))
    run = RunConfig.from_sources(None, {**BASE, "patches": ("2.4%", "3%")})
    assert parsed == ["2.4%", "3%"]
    assert run.patch_pixels(32) == (5, 6) and run.patch_pixels(224) == (35, 39)
    assert pickle.loads(pickle.dumps(run)).patch_pixels(224) == (35, 39)  # as Ray sends it
    run.cert_config(5, "scalecert")
    assert parsed == ["2.4%", "3%"]

    parsed.clear()
    where = {"data": "images/", "model": "cifar_resnet20", "out": "runs/x"}
    finetune = FinetuneRun.from_sources(None, {**where, "patch": "2.4%"})
    assert finetune.cert_config(32).patch_px == 5 and finetune.cert_config(224).patch_px == 35
    assert finetune.finetune_config(32).cert.patch_px == 5
    assert parsed == ["2.4%"]

    parsed.clear()
    analysis = AnalyzeRun.from_sources(None, {**where, "patch": "2.4%"})
    attack = AttackRun.from_sources(None, BASE)
    assert analysis.run.patch_pixels(32) == (5,) and attack.run.patch_pixels(32) == (5,)
    assert parsed == ["2.4%", "2.4%"]
