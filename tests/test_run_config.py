"""Run options: patch sizes, YAML with flag overrides, validation before any work."""

from __future__ import annotations

import pytest

from pipeline.options import PatchSize
from pipeline.run.config import RunConfig

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
