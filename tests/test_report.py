"""``scalecert report``: the reducer, report files, audit diff, S3 archive and the HTML page.

Most runs here are written directly as Parquet shards (fast, and lets us craft missing shards,
foreign fingerprints and error rows). The audit of two real pipeline runs is in
tests/test_pipeline_e2e.py, beside the other runs that share its Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import invoke_report as report

from pipeline.io.certificates import table_from_dicts, to_parquet_bytes
from pipeline.report.archive import archive_run
from pipeline.report.published import load_published
from pipeline.report.reduce import newcombe_paired, wilson

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def write_run(root: Path, rows_per_shard: list[list[dict[str, Any]] | None], *,
              fingerprint: str = "f" * 64, shard_fingerprints: dict[int, str] | None = None,
              data: Path | None = None, patch_px: tuple[int, ...] = (5,),
              methods: tuple[str, ...] = ("scalecert",)) -> Path:
    """A run folder: manifest.json and one Parquet file per shard (None: shard not written)."""
    run_id = fingerprint[:16]
    shards = []
    for index, rows in enumerate(rows_per_shard):
        ids = sorted({r["image_id"] for r in rows or []})
        shards.append({"index": index, "images": len(ids), "first": ids[0] if ids else "",
                       "last": ids[-1] if ids else ""})
    manifest = {"run_id": run_id, "fingerprint": fingerprint, "version": "0.1.0",
                "config": {"model": "cifar_resnet20", "methods": list(methods)},
                "checkpoint_sha256": "c" * 64, "patch_px": list(patch_px),
                "created": "2024-01-01T00:00:00Z", "image_side": 32,
                "dataset": {"source": str(data or root / "no-such-data"), "layout": "folder",
                            "classes": 10, "class_names": CLASSES,
                            "images": sum(s["images"] for s in shards)},
                "shards": shards}
    (root / "certificates").mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for index, rows in enumerate(rows_per_shard):
        if rows is None:
            continue
        fp = (shard_fingerprints or {}).get(index, fingerprint)
        for row in rows:
            row.update(run_id=run_id, shard=index)
        meta = {"run_id": fp[:16], "fingerprint": fp}
        (root / "certificates" / f"part-{index:05d}.parquet").write_bytes(
            to_parquet_bytes([table_from_dicts(rows)], meta))
    return root


def ok_row(image_id: str, label: int, prediction: int, certified: bool, *, alert: bool = False,
           n_evaluated: int = 4, latency: float = 2.0, patch_px: int = 5,
           method: str = "scalecert") -> dict[str, Any]:
    return {"image_id": image_id, "label": label, "status": "ok", "error": None, "method": method,
            "patch_px": patch_px, "prediction": prediction, "vanilla_prediction": label,
            "clean_output": -1 if alert else prediction, "certified": certified, "n_masks": 36,
            "n_evaluated": n_evaluated, "min_margin": 1.0 if certified else -1.0,
            "alert_box": [4, 8, 20, 24] if alert else None, "recovered_prediction": None,
            "latency_ms": latency}


def error_row(image_id: str, label: int, reason: str, patch_px: int = 5,
              method: str = "scalecert") -> dict[str, Any]:
    return {"image_id": image_id, "label": label, "status": "error", "error": reason,
            "method": method, "patch_px": patch_px, "certified": False}


def write_noise_images(data: Path, rows: list[dict[str, Any]], seed: int) -> None:
    """A 32x32 noise image at ``data/<image_id>`` for every row (for thumbnails)."""
    rng = np.random.default_rng(seed)
    for row in rows:
        (data / row["image_id"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / row["image_id"])


def synthetic_rows(count: int, seed: int, shard_prefix: str) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = int(rng.integers(0, 3))
        correct = bool(rng.random() < 0.8)
        rows.append(ok_row(f"{CLASSES[label]}/{shard_prefix}{i:03d}.png", label,
                           label if correct else (label + 1) % 3,
                           correct and bool(rng.random() < 0.7), alert=bool(rng.random() < 0.1),
                           n_evaluated=int(rng.integers(0, 37)), latency=float(rng.uniform(1, 3))))
    return rows


def test_wilson_interval_matches_known_values() -> None:
    # Newcombe (1998), Stat. Med. 17:857, example 81/263: score interval 0.2553 to 0.3662
    p = wilson(81, 263)
    assert (round(p.lo, 4), round(p.hi, 4)) == (0.2553, 0.3662)
    # 0/10: upper limit z^2 / (n + z^2)
    assert wilson(0, 10).lo == 0.0 and wilson(0, 10).hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert wilson(0, 0).value is None and (wilson(0, 0).lo, wilson(0, 0).hi) == (0.0, 1.0)


def test_paired_difference_interval() -> None:
    same = np.array([True] * 40 + [False] * 10)
    d = newcombe_paired(same, same)
    assert d.delta == 0 and d.lo <= 0 <= d.hi and d.lost == d.gained == 0
    worse = same.copy()
    worse[:8] = False
    d = newcombe_paired(worse, same)
    assert d.delta == pytest.approx(-8 / 50) and d.lost == 8 and d.gained == 0
    assert d.lo < d.delta < d.hi < 0  # the interval excludes no change
    unpaired_half = np.hypot(wilson(32, 50).hi - 0.64, 0.8 - wilson(40, 50).lo)
    assert d.hi - d.delta < unpaired_half  # pairing narrows it


def test_report_matches_the_parquet_rows(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [synthetic_rows(40, 1, "a"), synthetic_rows(37, 2, "b")])
    code, output = report(str(run), "--thumbnails", "0")
    assert code == 0, output
    doc = json.loads((run / "report.json").read_text())
    rows = [r for part in sorted((run / "certificates").glob("*.parquet"))
            for r in pq.read_table(part).to_pylist()]
    certified = sum(r["certified"] for r in rows)
    group = doc["groups"][0]
    assert group["certified_accuracy"]["successes"] == certified
    assert group["certified_accuracy"]["value"] == pytest.approx(certified / 77)
    assert group["certified_accuracy"]["ci95"] == pytest.approx(
        [wilson(certified, 77).lo, wilson(certified, 77).hi])
    assert group["clean_accuracy"]["successes"] == sum(
        r["clean_output"] == r["label"] for r in rows)
    alerts = sum(r["clean_output"] == -1 for r in rows)
    assert group["false_alert_rate"]["successes"] == alerts and doc["clean_alerts"]["total"] == alerts
    assert group["masks"]["evaluated_mean"] == pytest.approx(np.mean([r["n_evaluated"] for r in rows]))
    mean_latency = np.mean([r["latency_ms"] for r in rows])
    assert group["images_per_s"] == pytest.approx(1000 / mean_latency)
    assert [c["name"] for c in group["worst_classes"]] and set(
        c["name"] for c in group["worst_classes"]) <= set(CLASSES)
    assert doc["completeness"]["complete"] and doc["errors"]["images"] == 0
    assert {p["dataset"] for p in doc["published"]} == {"CIFAR-10"}
    assert all(p["published"] and p["url"] for p in doc["published"])
    md = (run / "report.md").read_text()
    assert "## Published (not measured here)" in md and "| published | ScaleCert |" in md
    assert "scalecert           5 px  certified" in output


def test_error_rows_count_as_failures_and_are_listed(tmp_path: Path) -> None:
    rows = [ok_row("bird/0.png", 2, 2, True), ok_row("bird/1.png", 2, 2, True),
            error_row("bird/2.png", 2, "truncated or corrupt image: broken"),
            error_row("stray.png", -1, "no label: not in a class folder")]
    run = write_run(tmp_path / "run", [rows])
    code, output = report(str(run))
    assert code == 0, output
    assert "2 errors" in output
    doc = json.loads((run / "report.json").read_text())
    group = doc["groups"][0]
    assert group["certified_accuracy"]["successes"] == 2 and group["certified_accuracy"]["n"] == 4
    assert group["error_images"] == 2 and group["false_alert_rate"]["n"] == 2
    assert doc["errors"] == {"images": 2, "items": [
        {"image_id": "bird/2.png", "label": 2, "error": "truncated or corrupt image: broken"},
        {"image_id": "stray.png", "label": -1, "error": "no label: not in a class folder"}]}
    assert "(no label)" in {c["name"] for c in group["worst_classes"]}
    assert "truncated or corrupt image" in (run / "report.html").read_text()


def test_missing_shard_is_reported_and_counted(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [synthetic_rows(10, 1, "a"), synthetic_rows(10, 2, "b")])
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "certificates" / "part-00001.parquet").unlink()
    code, output = report(str(run), "--thumbnails", "0")
    assert code == 4, output
    assert "MISSING shards [1]: 10 images" in output
    doc = json.loads((run / "report.json").read_text())
    assert doc["completeness"]["missing_shards"] == [
        {"index": 1, "images": 10, "first": manifest["shards"][1]["first"],
         "last": manifest["shards"][1]["last"]}]
    assert doc["groups"][0]["certified_accuracy"]["n"] == 20  # not silently 10
    assert doc["groups"][0]["missing_images"] == 10
    assert report(str(run), "--allow-missing", "--thumbnails", "0")[0] == 0


def test_foreign_fingerprint_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [synthetic_rows(5, 1, "a"), synthetic_rows(5, 2, "b")],
                    shard_fingerprints={1: "e" * 64})
    code, output = report(str(run))
    assert code != 0
    assert "part-00001.parquet: fingerprint eeeeeeeeeeeeeeee differs" in output
    assert not (run / "report.json").exists()


def test_rows_that_contradict_the_manifest_are_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [synthetic_rows(5, 1, "a")], patch_px=(5, 2))
    code, output = report(str(run))
    assert code != 0 and "rows, the manifest's plan gives 10" in output


def test_audit_diff_on_crafted_runs(tmp_path: Path) -> None:
    base = synthetic_rows(60, 3, "a")
    worse = [dict(r) for r in base]
    flipped = [r["image_id"] for r in worse if r["certified"]][:6]
    for r in worse:
        if r["image_id"] in flipped:
            r["certified"] = False
    old = write_run(tmp_path / "old", [base])
    new = write_run(tmp_path / "new", [worse], fingerprint="a" * 64)
    code, output = report(str(new), "--against", str(old), "--thumbnails", "0")
    assert code == 3, output
    assert "FAILED" in output and f"lost: {sorted(flipped)[0]}" in output
    diff = json.loads((new / "report.json").read_text())["diff"]
    group = diff["groups"][0]
    assert group["lost_certification"] == sorted(flipped) and group["gained_certification"] == []
    assert group["certified_drop_pp"] == pytest.approx(10.0)
    assert report(str(new), "--against", str(old), "--max-drop", "15", "--thumbnails", "0")[0] == 0
    other = write_run(tmp_path / "other", [synthetic_rows(59, 3, "a")])
    code, output = report(str(new), "--against", str(other))
    assert code == 1 and "not runs of the same images" in output


def test_published_rows_name_their_sources() -> None:
    rows = load_published()
    assert rows and all(r.title and r.url.startswith("https://") and r.kind for r in rows)
    cifar = {(r.defense, r.patch_area_percent): (r.clean_accuracy, r.certified_accuracy)
             for r in rows if r.dataset == "CIFAR-10"}
    assert cifar[("ScaleCert", 2.4)] == (78.9, 75.3) and cifar[("PatchGuard++", 0.4)] == (82.0, 78.8)
    assert {r.patch_px() for r in rows if r.dataset == "ImageNet"} == {32}


def test_archive_to_s3_is_verified_and_repeatable(tmp_path: Path, s3_env: str,
                                                  s3_server: Any) -> None:
    import boto3

    run = write_run(tmp_path / "run", [synthetic_rows(8, 1, "a")],
                    data=tmp_path / "datasets" / "cifar 10!")
    prefix = f"s3://{s3_env}/audits"
    code, output = report(str(run), "--archive", prefix, "--thumbnails", "0")
    assert code == 0, output
    run_id = "f" * 16
    uri = f"s3://{s3_env}/audits/cifar_resnet20/cifar-10/{run_id}"
    assert f"archived 5 objects to {uri} (5 uploaded, 0 unchanged, all verified)" in output
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=s3_env, Prefix="audits/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    base = f"audits/cifar_resnet20/cifar-10/{run_id}"
    assert keys == sorted(f"{base}/{n}" for n in (
        "certificates/part-00000.parquet", "manifest.json", "report.html", "report.json",
        "report.md"))
    body = client.get_object(Bucket=s3_env, Key=f"{base}/manifest.json")["Body"].read()
    assert body == (run / "manifest.json").read_bytes()
    assert listed[0]["ETag"].strip('"') == hashlib.md5(
        (run / keys[0][len(base) + 1:]).read_bytes()).hexdigest()
    # again: nothing changes (the report files are rewritten with a new "generated" time)
    code, output = report(str(run), "--archive", prefix, "--thumbnails", "0")
    assert code == 0, output
    assert "archived 5 objects" in output and "all verified" in output
    uploaded, unchanged = map(int, re.search(r"(\d+) uploaded, (\d+) unchanged", output).groups())
    assert uploaded + unchanged == 5 and unchanged >= 2  # reports differ only in "generated"
    again = archive_run(str(run), prefix)  # no report rewrite: nothing to upload
    assert again.uri == uri and again.uploaded == () and len(again.unchanged) == 5
    assert again.verified == 5
    code, output = report(str(run), "--archive", "gs://nope/x", "--thumbnails", "0")
    assert code == 1 and "expected s3://bucket/prefix" in output


def test_html_has_the_plots_and_alert_thumbnails(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = synthetic_rows(30, 5, "a")
    write_noise_images(data, rows, seed=0)
    run = write_run(tmp_path / "run", [rows], data=data)
    assert report(str(run))[0] == 0
    page = (run / "report.html").read_text()
    alerts = sum(r["clean_output"] == -1 for r in rows)
    assert alerts > 0
    assert page.count('<svg id="plot-certified"') == 1 and 'class="published-point"' in page
    assert 'class="ci-bar"' in page and 'class="masks-histogram"' in page
    assert page.count('class="alert-thumb"') == alerts and page.count("data:image/png;base64,") == alerts
    assert page.count('class="alert-box"') == alerts
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    shutil.rmtree(data)  # unreadable images: the page says so, the report still succeeds
    assert report(str(run))[0] == 0
    page = (run / "report.html").read_text()
    assert 'id="thumbnail-problems"' in page and "cannot read" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    data = tmp_path / "data"
    rows = synthetic_rows(40, 7, "a")
    write_noise_images(data, rows, seed=1)
    old = write_run(tmp_path / "old", [rows], data=data)
    worse = [dict(r, certified=False) if i % 5 == 0 else dict(r) for i, r in enumerate(rows)]
    run = write_run(tmp_path / "run", [worse], data=data, fingerprint="b" * 64)
    assert report(str(run), "--against", str(old), "--max-drop", "100")[0] == 0
    shot = tmp_path / "report.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               f"--screenshot={shot}", "--window-size=1200,2000",
               (run / "report.html").as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot: rc {done.returncode}\n{done.stderr[-2000:]}"
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1200)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, plots, thumbnails
    target = os.environ.get("SCALECERT_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "report.png")


def test_the_alert_confidence_curve_from_the_rows(tmp_path) -> None:
    """Four images with known confidences: at each TAU the reducer counts exactly the
    certificates (min_confidence >= TAU + margin/2) and the clean alerts
    (max_alert_confidence >= TAU) the rule gives, and picks the least TAU with <= 10% false
    alerts; recovery groups get no curve."""
    rows = [
        # certified, every window at >= 0.8, one disagreeing window at 0.7
        ok_row("cat/0.png", 3, 3, True, alert=True) | {"min_confidence": 0.8,
                                                         "max_alert_confidence": 0.7},
        # certified, windows down to 0.4, nothing disagrees
        ok_row("cat/1.png", 3, 3, True) | {"min_confidence": 0.4, "max_alert_confidence": 0.0},
        # not certified: a window disagrees at 0.95
        ok_row("dog/2.png", 5, 5, False, alert=True) | {"min_confidence": 0.5,
                                                          "max_alert_confidence": 0.95},
        # wrong M(x), no alert
        ok_row("dog/3.png", 5, 4, False) | {"min_confidence": 0.9, "max_alert_confidence": 0.0},
    ]
    run = write_run(tmp_path / "run", [rows])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"].update(margin=1e-3, full_map=True)
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, output = report(str(run))
    assert code == 0, output
    curve = json.loads((run / "report.json").read_text())["groups"][0]["confidence_curve"]
    assert curve["exact"] is True
    points = {p["tau"]: p for p in curve["points"]}
    counts = {tau: tuple(points[tau][name]["successes"]
                         for name in ("certified_accuracy", "clean_accuracy", "false_alert_rate"))
              for tau in (0.3, 0.6, 0.75, 0.9, 0.99)}
    assert counts == {0.3: (2, 1, 2), 0.6: (1, 1, 2), 0.75: (1, 2, 1), 0.9: (0, 2, 1),
                      0.99: (0, 3, 0)}
    assert curve["at_target"]["tau"] == 0.97  # 1 of 4 alerts (25%) up to TAU 0.95
    markdown = (run / "report.md").read_text()
    assert "## Alert confidence: scalecert, 5 px" in markdown and "At TAU = 0.97" in markdown
    assert 'id="plot-tradeoff"' in (run / "report.html").read_text()
