"""The attack report: reading an attack run's shards, the figures, the report files.

Runs are hand-made rows (``attack_table_from_dicts``) written as real Parquet shards with a
manifest, as ``scalecert attack`` lays them out; no Ray, no torch.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.io.attack_rows import attack_part_location, attack_table_from_dicts
from pipeline.io.certificates import METADATA_KEY
from pipeline.report.attacks import (NO_VIOLATIONS, AttackGroup, attack_figures,
                                     read_attack_run, render_attack_html,
                                     render_attack_markdown, violation_lines,
                                     write_attack_report)
from pipeline.report.published import load_published_attacks
from pipeline.report.reduce import MissingShard, ReportRefused

FINGERPRINT = "f" * 64
SOURCE = "ScaleCert (Han et al., NeurIPS 2021), Section 4.4"


def write_attack_run(root: Path, shards: list[list[dict[str, Any]] | None], *,
                     shard_fingerprints: dict[int, str] | None = None,
                     manifest_extra: dict[str, Any] | None = None) -> Path:
    """An attack run folder: manifest.json and attacks/part-NNNNN.parquet per shard (None:
    listed in the manifest, file not written)."""
    run_id = FINGERPRINT[:16]
    entries = []
    for index, rows in enumerate(shards):
        ids = sorted({r["image_id"] for r in rows or []})
        entries.append({"index": index, "images": len(ids), "first": ids[0] if ids else "",
                        "last": ids[-1] if ids else ""})
    manifest = {"run_id": run_id, "fingerprint": FINGERPRINT, "version": "0.1.0",
                "config": {"model": "cifar_resnet20", "methods": ["scalecert"]},
                "checkpoint_sha256": "c" * 64, "patch_px": [5], "created": "2024-01-01T00:00:00Z",
                "dataset": {"source": str(root / "data"), "layout": "folder", "classes": 10,
                            "class_names": [str(i) for i in range(10)], "listed": 0,
                            "images": sum(e["images"] for e in entries)},
                "image_side": 32, "shards": entries, "job": "attack",
                "attack": {"attack": "per-image", "attack_model": "defended", "steps": 40},
                **(manifest_extra or {})}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for index, rows in enumerate(shards):
        if rows is None:
            continue
        table = attack_table_from_dicts([{**r, "run_id": run_id, "shard": index} for r in rows])
        fingerprint = (shard_fingerprints or {}).get(index, FINGERPRINT)
        meta = json.dumps({"run_id": fingerprint[:16], "fingerprint": fingerprint})
        at = Path(attack_part_location(str(root), index))
        at.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta}), at)
    return root


def row(image_id: str, vanilla: int, prediction: int, attacked_vanilla: int,
        attacked: int, detect: int, *, certified: bool = False, localized: bool | None = None,
        recovered: int | None = None, steps: int = 10, loss: float = 1.0,
        label: int = 3) -> dict[str, Any]:
    """An ok row of the per-image attack on the defended model, scalecert at 5 px."""
    alert = detect == -1
    return {"image_id": image_id, "label": label, "status": "ok", "attack": "per-image",
            "attack_model": "defended", "method": "scalecert", "patch_px": 5,
            "patch_box": [4, 8, 9, 13], "vanilla_prediction": vanilla, "prediction": prediction,
            "certified": certified, "attacked_vanilla_prediction": attacked_vanilla,
            "attacked_prediction": attacked, "detect_output": detect,
            "alert_box": [0, 0, 8, 8] if alert else None, "localized": localized,
            "recovered_prediction": recovered, "attack_loss": loss, "attack_steps": steps,
            "latency_ms": 2.0}


def error_row(image_id: str, label: int = 3) -> dict[str, Any]:
    """As ``attack_error_rows`` writes them: no attack_model, no predictions."""
    return {"image_id": image_id, "label": label, "status": "error", "error": "cannot decode",
            "attack": "per-image", "method": "scalecert", "patch_px": 5, "certified": False}


def hand_rows() -> list[dict[str, Any]]:
    """Five ok rows and an error row whose figures are worked out in the test below."""
    return [
        # fools the undefended model only; detection keeps the label; certified
        row("cat/1.png", 3, 3, 7, 3, 3, certified=True, steps=10, loss=1.0),
        # fools both models; ALERT, patch located, occluding it recovers the label
        row("cat/2.png", 3, 3, 7, 7, -1, localized=True, recovered=3, steps=20, loss=2.0),
        # fools the pruned model only; ALERT elsewhere, occlusion gives a wrong label
        row("cat/3.png", 3, 3, 3, 5, -1, localized=False, recovered=5, steps=30, loss=3.0),
        # vanilla wrong on the clean image; detection returns a wrong label (not certified)
        row("cat/4.png", 2, 3, 2, 5, 5, steps=40, loss=4.0),
        # M wrong on the clean image; ALERT, localization unknown (null), nothing recovered
        row("cat/5.png", 3, 2, 7, 2, -1, localized=None, recovered=None, steps=50, loss=5.0),
        error_row("cat/6.png"),
    ]


def close(p: Any, successes: int, n: int, lo: float, hi: float) -> bool:
    return (p.successes, p.n) == (successes, n) and p.value == pytest.approx(successes / n) \
        and (p.lo, p.hi) == pytest.approx((lo, hi), abs=5e-5)


def test_figures_by_hand(tmp_path: Path) -> None:
    run = read_attack_run(str(write_attack_run(tmp_path / "run", [hand_rows()])))
    assert run.missing == () and run.table.num_rows == 6
    [group] = attack_figures(run.table)  # the error row joins its group (attack model filled)
    assert (group.attack, group.attack_model, group.method, group.patch_px) == (
        "per-image", "defended", "scalecert", 5)
    assert (group.rows, group.ok, group.errors, group.certified) == (6, 5, 1, 1)
    # 95% Wilson intervals of 3/4, 3/5, 1/5, 1/3, 2/5 (z = 1.96)
    assert close(group.undefended_success, 3, 4, 0.3006, 0.9544)  # 1, 2, 5 of 1, 2, 3, 5
    assert close(group.pruned_success, 3, 4, 0.3006, 0.9544)  # 2, 3, 4 of 1, 2, 3, 4
    assert close(group.alert_rate, 3, 5, 0.2307, 0.8824)  # 2, 3, 5
    assert close(group.defended_fooled, 1, 5, 0.0362, 0.6245)  # 4
    assert close(group.localized, 1, 3, 0.0615, 0.7923)  # 2 of the alerts 2, 3, 5 (null: no)
    assert close(group.empirical_recovery, 2, 5, 0.1176, 0.7693)  # 1 (kept), 2 (recovered)
    assert close(group.undefended_accuracy_attacked, 1, 5, 0.0362, 0.6245)  # 3
    assert group.violations == () and violation_lines([group]) == []
    assert group.mean_attack_steps == 30 and group.mean_attack_loss == 3.0
    assert group.mean_latency_ms == 2.0
    # a DataFrame of the same rows (nulls as NaN) gives the same figures
    assert attack_figures(run.table.to_pandas()) == [group]

    written = write_attack_report(str(tmp_path / "report"), run, [group])
    assert [Path(w).name for w in written] == [
        "attack_report.json", "attack_report.md", "attack_report.html"]
    doc = json.loads(Path(written[0]).read_text())
    figure = doc["groups"][0]["localized"]
    assert (figure["value"], figure["successes"], figure["n"]) == (pytest.approx(1 / 3), 1, 3)
    assert tuple(figure["ci95"]) == pytest.approx((0.0615, 0.7923), abs=5e-5)
    assert doc["violations"] == {"count": 0, "items": []}
    assert doc["completeness"]["complete"] and doc["groups"][0]["errors"] == 1
    md = Path(written[1]).read_text()
    assert NO_VIOLATIONS in md
    assert "| per-image | defended | scalecert | 5 px | 6 | 1 | 75.0% [30.1, 95.4] |" in md
    assert NO_VIOLATIONS in Path(written[2]).read_text()


def test_a_planted_violation_is_counted_and_listed(tmp_path: Path) -> None:
    rows = hand_rows()
    rows[3]["certified"] = True  # cat/4: certified, yet detection returns 5 without ALERT
    run = read_attack_run(str(write_attack_run(tmp_path / "run", [rows])))
    [group] = attack_figures(run.table)
    assert [(v.image_id, v.label, v.detect_output, v.patch_box) for v in group.violations] == [
        ("cat/4.png", 3, 5, (4, 8, 9, 13))]
    assert group.certified == 2
    lines = violation_lines([group])
    assert len(lines) == 1 and "cat/4.png" in lines[0] and "returned 5" in lines[0]
    written = write_attack_report(str(tmp_path / "run"), run, [group])
    doc = json.loads(Path(written[0]).read_text())
    assert doc["violations"]["count"] == 1 and doc["groups"][0]["violation_count"] == 1
    assert doc["groups"][0]["violations"] == doc["violations"]["items"]
    assert doc["violations"]["items"][0]["image_id"] == "cat/4.png"
    assert doc["violations"]["items"][0]["patch_box"] == [4, 8, 9, 13]
    md, page = Path(written[1]).read_text(), Path(written[2]).read_text()
    assert "**1 violations**" in md and "| `cat/4.png` | 3 | 5 | [4, 8, 9, 13] |" in md
    assert NO_VIOLATIONS not in md and NO_VIOLATIONS not in page
    assert 'id="violations"' in page and "<td>cat/4.png</td>" in page
    # an uncertified image fooled the same way is no violation
    rows[3]["certified"] = False
    assert attack_figures(attack_table_from_dicts(rows))[0].violations == ()


def test_groups_split_by_method_and_patch(tmp_path: Path) -> None:
    rows = []
    for i in range(3):
        for method in ("scalecert", "masking"):
            for px in (5, 8):
                correct = method == "masking" or px == 8
                rows.append(row(f"dog/{i}.png", 5, 5, 1, 5, 5 if correct else 1, label=5)
                            | {"method": method, "patch_px": px})
    run = read_attack_run(str(write_attack_run(
        tmp_path / "run", [rows], manifest_extra={
            "patch_px": [5, 8], "config": {"model": "m", "methods": ["scalecert", "masking"]}})))
    groups = attack_figures(run.table)
    assert [(g.method, g.patch_px) for g in groups] == [
        ("masking", 5), ("masking", 8), ("scalecert", 5), ("scalecert", 8)]
    assert [g.defended_fooled.successes for g in groups] == [0, 0, 3, 0]
    assert all(g.ok == 3 and g.undefended_success.successes == 3 for g in groups)


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    first = hand_rows()
    second = [row(f"cat/{i}.png", 3, 3, 3, 3, 3) for i in range(10, 14)]
    folder = write_attack_run(tmp_path / "run", [first, second])
    Path(attack_part_location(str(folder), 1)).unlink()
    run = read_attack_run(str(folder))
    assert run.missing == (MissingShard(1, 4, "cat/10.png", "cat/13.png"),)
    [group] = attack_figures(run.table)
    assert group.rows == 6  # the present shard's rows only
    written = write_attack_report(str(folder), run, [group])
    doc = json.loads(Path(written[0]).read_text())
    assert doc["completeness"]["missing_shards"] == [
        {"index": 1, "images": 4, "first": "cat/10.png", "last": "cat/13.png"}]
    assert not doc["completeness"]["complete"] and doc["completeness"]["images_missing"] == 4
    md, page = Path(written[1]).read_text(), Path(written[2]).read_text()
    assert "**1 MISSING" in md and "## Missing shards" in md and "| 1 | 4 | cat/10.png |" in md
    assert 'id="missing"' in page and "1 shards missing" in page


def test_a_shard_of_another_run_is_refused(tmp_path: Path) -> None:
    folder = write_attack_run(tmp_path / "run", [hand_rows(), [row("cat/9.png", 3, 3, 3, 3, 3)]],
                              shard_fingerprints={1: "e" * 64})
    with pytest.raises(ReportRefused, match=r"part-00001\.parquet: fingerprint eeeeeeeeeeeeeeee "
                                            r"differs from manifest\.json's ffffffffffffffff"):
        read_attack_run(str(folder))


def test_rows_that_contradict_the_manifest_are_refused(tmp_path: Path) -> None:
    rows = hand_rows()
    folder = write_attack_run(tmp_path / "twice", [rows + [dict(rows[0])]])
    with pytest.raises(ReportRefused, match=r"part-00000\.parquet: image cat/1\.png has more "
                                            "than one row for per-image / scalecert at 5 px"):
        read_attack_run(str(folder))
    lacking = rows + [row("cat/7.png", 3, 3, 3, 3, 3) | {"patch_px": 8},
                      row("cat/7.png", 3, 3, 3, 3, 3)]  # cat/1..6 have no 8 px rows
    with pytest.raises(ReportRefused, match="some images lack rows"):
        read_attack_run(str(write_attack_run(tmp_path / "lacking", [lacking])))
    with pytest.raises(ReportRefused, match="no manifest.json .not a `scalecert attack` run"):
        read_attack_run(str(tmp_path))
    certify = write_attack_run(tmp_path / "certify", [rows], manifest_extra={"job": None})
    with pytest.raises(ReportRefused, match="not a `scalecert attack` run folder"):
        read_attack_run(str(certify))
    other = write_attack_run(tmp_path / "other", [rows],
                             manifest_extra={"attack": {"attack": "universal"}})
    with pytest.raises(ReportRefused, match=r"attack \['per-image'\] differ from the manifest's "
                                            r"\['universal'\]"):
        read_attack_run(str(other))
    stray = write_attack_run(tmp_path / "stray", [rows])
    (stray / "attacks" / "part-00007.parquet").write_bytes(
        Path(attack_part_location(str(stray), 0)).read_bytes())
    with pytest.raises(ReportRefused, match=r"part-00007\.parquet: not a shard of the manifest"):
        read_attack_run(str(stray))


def test_published_section_4_4_figures_are_labelled_published(tmp_path: Path) -> None:
    published = {r.figure: r for r in load_published_attacks()}
    assert published["undefended_accuracy_attacked"].value == 14.0
    assert published["empirical_recovery"].value == 85.8
    assert all(r.citation == SOURCE and r.model == "ResNet-50" and r.dataset == "ImageNet"
               and r.patch_area_percent == 5.0 for r in published.values())
    run = read_attack_run(str(write_attack_run(tmp_path / "run", [hand_rows()])))
    groups = attack_figures(run.table)
    md = render_attack_markdown(groups, run.manifest)
    published_md = md[md.index("## Published (not measured here)"):md.index("## Violations")]
    lines = [line for line in published_md.splitlines()
             if line.startswith("| published |") and "| figure |" not in line]
    assert len(lines) == 2
    assert "| 14.0% | ResNet-50 | ImageNet | 5% (50 px) | no " in lines[0]
    assert "undefended accuracy under attack" in lines[0] and "85.8%" in lines[1]
    assert all(SOURCE in line for line in lines)
    page = render_attack_html(groups, run.manifest)
    section = page[page.index("Published results (not measured here)"):]
    section = section[:section.index("</table>")]
    assert section.count('<tr class="published"><td>published</td>') == 2
    assert "<td>14.0%</td>" in section and "<td>85.8%</td>" in section and SOURCE in section
    imagenet = dict(run.manifest, image_side=224, dataset={**run.manifest["dataset"],
                                                           "classes": 1000})
    assert "| 5% (50 px) | yes |" in render_attack_markdown(groups, imagenet)


class _Balance(HTMLParser):
    """Open tags are closed in order (void elements aside)."""

    VOID = frozenset({"meta", "br", "img", "rect", "line", "circle", "path", "polyline"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_is_one_self_contained_page(tmp_path: Path) -> None:
    rows = hand_rows() + [r | {"patch_px": 8} for r in hand_rows()]
    run = read_attack_run(str(write_attack_run(tmp_path / "run", [rows],
                                               manifest_extra={"patch_px": [5, 8]})))
    groups = attack_figures(run.table)
    assert [g.patch_px for g in groups] == [5, 8]
    page = render_attack_html(groups, run.manifest)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1
    assert page.count('<table id="attack-measured">') == 1
    parser = _Balance()
    parser.feed(page)
    assert parser.problems == [] and parser.stack == []
    svg = page[page.index("<svg"):page.index("</svg>") + len("</svg>")]
    root = ET.fromstring(svg)  # the plot is well-formed XML
    assert root.get("id") == "plot-attack-rates"
    bars = root.findall("{http://www.w3.org/2000/svg}g")
    assert len(bars) == 7 * len(groups)  # every rate of every group has rows here
    assert len(root.findall(".//{http://www.w3.org/2000/svg}line[@class='ci-bar']")) == len(bars)
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_a_rate_without_rows_is_not_available() -> None:
    """Only errors: every rate has n = 0 (n/a), nothing divides by zero."""
    table = attack_table_from_dicts([error_row("cat/1.png")])
    [group] = attack_figures(table)
    assert isinstance(group, AttackGroup) and group.attack_model is None
    assert all(p.n == 0 and p.value is None for p in group.rates().values())
    assert group.mean_attack_steps is None
    md = render_attack_markdown([group], {"run_id": "r", "shards": []})
    assert "| n/a |" in md


def test_a_null_prediction_is_never_a_success() -> None:
    """An ok row without the attacked predictions leaves the attack-success denominators and
    counts as wrong in the accuracies; a null final label after ALERT is no recovery."""
    table = attack_table_from_dicts([
        row("cat/1.png", 3, 3, 7, 7, -1, recovered=3, localized=True)
        | {"attacked_vanilla_prediction": None, "attacked_prediction": None},
        row("cat/2.png", 3, 3, 7, 7, 3),
    ])
    [group] = attack_figures(table)
    assert (group.undefended_success.successes, group.undefended_success.n) == (1, 1)
    assert (group.pruned_success.successes, group.pruned_success.n) == (1, 1)
    assert (group.undefended_accuracy_attacked.successes,
            group.undefended_accuracy_attacked.n) == (0, 2)
    assert (group.empirical_recovery.successes, group.empirical_recovery.n) == (2, 2)
    table = attack_table_from_dicts([row("cat/1.png", 3, 3, 7, 7, -1, recovered=None)])
    assert attack_figures(table)[0].empirical_recovery.successes == 0
    table = attack_table_from_dicts([row("cat/1.png", 3, 3, 7, 7, 3, certified=True)
                                     | {"detect_output": None}])
    [group] = attack_figures(table)
    assert (group.defended_fooled.successes, group.alert_rate.successes) == (0, 0)
    assert group.violations == () and group.defended_fooled.n == 1
