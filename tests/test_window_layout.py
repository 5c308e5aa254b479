"""Window layouts: "clipped" (the default, unchanged) and "patchcleanser" (the reference
PatchCleanser's mask sets, the last window shifted inward at full size).

The reference's rule is written here from its definition (``gen_mask_set`` in
inspire-group/PatchCleanser ``utils/defense.py``), not copied: per axis of side n, patch p and
stride s (given, or ``ceil((n - p + 1) / k)`` for k masks per axis), masks of side
``m = min(p + s - 1, n)`` start at every multiple of s up to ``n - m``, and at ``n - m`` as well
when ``n - m`` is not a multiple of s.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.report.text import layout_note, settings_text
from pipeline.run.config import RunConfig
from scalecert import CertConfig
from scalecert.config import WINDOW_LAYOUTS
from scalecert.errors import InvalidOption
from scalecert.masks import MaskFamily, axis_windows, stride_for

SIDES = (32, 224, 240, 7, 33, 97, 225, 299)
PATCHES = (1, 2, 5, 23, 32)
MASK_COUNTS = (1, 2, 3, 5, 6, 7, 10)


def reference_axis(n: int, p: int, s: int) -> list[tuple[int, int]]:
    """gen_mask_set's windows of one axis, from its definition."""
    m = min(p + s - 1, n)
    starts = [a for a in range(n - m + 1) if a % s == 0]
    if (n - m) % s != 0:
        starts.append(n - m)
    return [(a, a + m) for a in starts]


def clipped_axis(n: int, p: int, s: int, r: int) -> list[tuple[int, int]]:
    """The clipped layout's formula: side p + r*s - 1 from -(r-1)*s + i*s, clipped."""
    count = math.ceil((n - p + 1) / s) + r - 1
    w = p + r * s - 1
    return [(max(-(r - 1) * s + i * s, 0), min(-(r - 1) * s + i * s + w, n))
            for i in range(count)]


def axis_cases():
    for n, p, k in itertools.product(SIDES, PATCHES, MASK_COUNTS):
        if p <= n:
            yield n, p, k


def test_the_patchcleanser_layout_follows_gen_mask_sets_rule() -> None:
    checked = 0
    for n, p, k in axis_cases():
        s = math.ceil((n - p + 1) / k)  # the reference's stride for k masks per axis
        assert stride_for(n, p, k, 1) == s
        expected = reference_axis(n, p, s)
        assert list(axis_windows(n, p, s, 1, "patchcleanser")) == expected, (n, p, k)
        checked += 1
    assert checked > 200


def test_the_patchcleanser_layout_with_a_given_stride() -> None:
    for n, p, s in itertools.product(SIDES, PATCHES, (1, 3, 4, 8, 17)):
        if p <= n:
            assert list(axis_windows(n, p, s, 1, "patchcleanser")) == reference_axis(n, p, s)


@pytest.mark.parametrize(("hw", "p", "k"), [
    ((32, 32), 5, 6), ((224, 224), 32, 6), ((240, 240), 36, 6), ((224, 224), 23, 8),
    ((33, 47), 5, 6), ((225, 299), 32, 5),
])
def test_the_family_is_the_product_of_the_reference_axes(hw, p, k) -> None:
    family = MaskFamily.build(hw, p, masks_per_axis=k, layout="patchcleanser")
    rows = reference_axis(hw[0], p, math.ceil((hw[0] - p + 1) / k))
    cols = reference_axis(hw[1], p, math.ceil((hw[1] - p + 1) / k))
    assert list(family.rows) == rows and list(family.cols) == cols
    assert family.layout == "patchcleanser"
    expected = [(t, l, b, r) for t, b in rows for l, r in cols]
    assert family.boxes().tolist() == [list(box) for box in expected]


def test_the_reference_issues_example_on_32_px() -> None:
    """5 px patch on 32 px, 6 masks: 9 px windows at stride 5; the reference's last one is
    [23, 32), the clipped layout's [25, 32)."""
    reference = MaskFamily.build((32, 32), 5, masks_per_axis=6, layout="patchcleanser")
    clipped = MaskFamily.build((32, 32), 5, masks_per_axis=6)
    assert reference.rows == ((0, 9), (5, 14), (10, 19), (15, 24), (20, 29), (23, 32))
    assert clipped.rows == ((0, 9), (5, 14), (10, 19), (15, 24), (20, 29), (25, 32))


@pytest.mark.parametrize("r", [1, 2, 3])
def test_the_default_layout_is_unchanged(r: int) -> None:
    for n, p, k in axis_cases():
        if k < r:
            continue
        s = stride_for(n, p, k, r)
        assert list(axis_windows(n, p, s, r)) == clipped_axis(n, p, s, r), (n, p, k, r)
        assert axis_windows(n, p, s, r, "clipped") == axis_windows(n, p, s, r)
    family = MaskFamily.build((32, 32), 5, masks_per_axis=6)
    assert family.layout == "clipped"
    assert family == MaskFamily.build((32, 32), 5, masks_per_axis=6, layout="clipped")


def test_both_layouts_have_as_many_windows_and_the_reference_occludes_at_least_as_much() -> None:
    for n, p, k in axis_cases():
        s = stride_for(n, p, k, 1)
        clipped = axis_windows(n, p, s, 1)
        shifted = axis_windows(n, p, s, 1, "patchcleanser")
        assert len(clipped) == len(shifted) <= k
        for (a, b), (c, d) in zip(clipped, shifted):
            assert d - c >= b - a and (a, b) == (c, d) or (a > c and b == d == n)


def covered(windows, q: int, p: int) -> bool:
    return any(start <= q and q + p <= stop for start, stop in windows)


@pytest.mark.parametrize("layout", WINDOW_LAYOUTS)
def test_every_patch_position_lies_inside_a_window_brute_force(layout: str) -> None:
    for n in range(1, 41):
        for p in range(1, n + 1):
            strides = {*range(1, 9), *(stride_for(n, p, k, 1) for k in range(1, 9))}
            for s in strides:
                windows = axis_windows(n, p, s, 1, layout)
                assert all(0 <= a < b <= n for a, b in windows)
                missing = [q for q in range(n - p + 1) if not covered(windows, q, p)]
                assert missing == [], (layout, n, p, s, missing)


@pytest.mark.parametrize("layout", WINDOW_LAYOUTS)
def test_every_2d_patch_position_lies_inside_a_mask(layout: str) -> None:
    for hw, p, k in itertools.product([(12, 12), (13, 17), (32, 32)], [1, 3, 5], [2, 3, 6]):
        boxes = MaskFamily.build(hw, p, masks_per_axis=k, layout=layout).boxes().tolist()
        for top in range(hw[0] - p + 1):
            for left in range(hw[1] - p + 1):
                assert any(t <= top and l <= left and top + p <= b and left + p <= r
                           for t, l, b, r in boxes), (layout, hw, p, k, top, left)


def test_layouts_are_refused_by_name() -> None:
    with pytest.raises(InvalidOption, match="window_layout: patchcleanser needs r = 1"):
        CertConfig(patch_px=5, r=2, window_layout="patchcleanser")
    with pytest.raises(InvalidOption, match="window_layout: one of clipped, patchcleanser"):
        CertConfig(patch_px=5, window_layout="shifted")
    with pytest.raises(InvalidOption, match="window_layout: patchcleanser needs r = 1"):
        MaskFamily.build((32, 32), 5, r=2, masks_per_axis=6, layout="patchcleanser")
    with pytest.raises(InvalidOption, match="window_layout"):
        axis_windows(32, 5, 5, 1, "shifted")


DEFAULT_JSON = ('{"alert_confidence": null, "layer": null, "margin": 0.001, "mask_stride": null, '
                '"masks_per_axis": 6, "method": "scalecert", "occlusion_value": 0.0, '
                '"patch_px": 5, "r": 1, "top_k": 0.15, "vote": "unanimous"}')


def test_the_default_layout_leaves_the_config_json_as_it_was() -> None:
    assert CertConfig(patch_px=5).to_json() == DEFAULT_JSON
    assert CertConfig(patch_px=5, window_layout="clipped").to_json() == DEFAULT_JSON
    reference = CertConfig(patch_px=5, window_layout="patchcleanser")
    assert json.loads(reference.to_json())["window_layout"] == "patchcleanser"
    assert CertConfig.from_dict(json.loads(reference.to_json())) == reference
    assert CertConfig.from_dict(json.loads(DEFAULT_JSON)) == CertConfig(patch_px=5)


BASE = {"data": "images/", "model": "cifar_resnet20", "out": "runs/x", "patches": ("2.4%",)}


def test_the_run_fingerprint_holds_the_layout_only_when_not_the_default() -> None:
    default = RunConfig(**BASE).fingerprint_fields()
    assert "window_layout" not in default
    assert RunConfig(**BASE, window_layout="clipped").fingerprint_fields() == default
    reference = RunConfig(**BASE, window_layout="patchcleanser")
    assert reference.fingerprint_fields() == {**default, "window_layout": "patchcleanser"}
    assert reference.cert_config(5, "patchcleanser").window_layout == "patchcleanser"
    with pytest.raises(InvalidOption, match="--window-layout: patchcleanser needs r = 1"):
        RunConfig(**BASE, window_layout="patchcleanser", r=2)


def test_the_yaml_option(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: images/\nmodel: cifar_resnet20\nout: runs/a\npatch: 2.4%\n"
                    "window-layout: patchcleanser\n")
    assert RunConfig.from_sources(path, {}).window_layout == "patchcleanser"


def test_the_certify_flag(tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "_run_and_report", lambda run, quiet: seen.append(run))
    flags = ["certify", "--data", str(tmp_path), "--model", "cifar_resnet20", "--patch", "5",
             "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli.main, [*flags, "--window-layout", "patchcleanser"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli.main, flags)
    assert result.exit_code == 0, result.output
    assert [run.window_layout for run in seen] == ["patchcleanser", "clipped"]
    refused = CliRunner().invoke(cli.main, [*flags, "--window-layout", "shifted"])
    assert refused.exit_code == 2 and "clipped" in refused.output
    refused = CliRunner().invoke(cli.main, [*flags, "--window-layout", "patchcleanser",
                                            "--r", "2"])
    assert refused.exit_code == 2 and "--window-layout: patchcleanser needs r = 1" in refused.output


def test_the_report_shows_the_layout() -> None:
    assert settings_text({"masks_per_axis": 6, "r": 1}).endswith("window layout clipped")
    assert "window layout patchcleanser" in settings_text(
        {"masks_per_axis": 6, "r": 1, "vote": "unanimous", "window_layout": "patchcleanser"})


def test_published_reference_figures_ask_for_the_reference_layout() -> None:
    published = [{"defense": "PatchCleanser"}, {"defense": "ScaleCert"}]
    assert "--window-layout patchcleanser" in layout_note(published, {"r": 1})
    assert layout_note(published, {"window_layout": "patchcleanser"}) is None
    assert layout_note([{"defense": "ScaleCert"}], {}) is None
