"""The reducer: read a run's certificate shards, check them, and compute its figures.

Checks (a failed check is :class:`ReportRefused`, naming the file and what is wrong):
- ``manifest.json`` exists; every present shard's Parquet metadata (key ``scalecert``) has the
  manifest's fingerprint, its rows the manifest's run_id and the shard's index, and one row
  per (image, patch_px, method) of the manifest; row counts match the manifest's shard plan.
- Shards listed in the manifest but absent are *missing*: reported (index, image count, first
  and last image id), never silently dropped: their images count in every denominator below
  as neither correct nor certified.

Figures per (method, patch_px), all over the ``n`` images the manifest lists (error rows and
missing images count as failures), each with a 95% Wilson score interval:
- ``vanilla_accuracy``: vanilla_prediction == label (the unpruned model);
- ``pruned_accuracy``: prediction == label (M(x), the SIN-pruned model);
- ``clean_accuracy``: clean_output == label (detection on the clean image returns the label);
- ``certified_accuracy``: certified.
- ``false_alert_rate``: rows with status ok and clean_output == -1 (ALERT on the clean image,
  whatever the label) over rows with status ok: a property of the detector on inputs it ran
  on, so error rows and missing images are left out of this one and reported separately.
  None for a recovery method (``guarantee``, from the method registry), which never alerts:
  its ``clean_output`` is the recovered prediction, so ``clean_accuracy`` is recovered clean
  accuracy and ``certified_accuracy`` certified recovery.
Alert-confidence curve (detection methods, :func:`confidence_curve`): from the rows'
``min_confidence`` and ``max_alert_confidence``, each figure at alert confidences TAU on a grid
(DESIGN-NOTES "Alert confidence"): certified = certified and min_confidence >= TAU + margin/2;
clean = prediction == label and max_alert_confidence < TAU; false alert =
max_alert_confidence >= TAU. Exact for a ``--full-map`` run; with work avoidance the alerts
count only the windows run, so clean accuracy is an upper and the false-alert rate a lower bound.
Masks: ``n_masks`` per image and ``n_evaluated`` (mean, p50, p95, histogram) over ok rows.
Latency: mean / p50 / p95 of ``latency_ms`` over ok rows (the per-image share of the batch's
wall time); ``images_per_s = 1000 / mean latency_ms``, a per-worker figure from the rows, not
the run's wall-clock throughput.

Audit diff (:func:`diff_runs`): two complete runs of the same images and labels, rows paired
by (image_id, method, patch_px). Each accuracy delta (new - old, percentage points) has a 95%
interval by Newcombe's method 10 for *paired* proportions (Wilson intervals of both runs
combined with the phi correlation of the 2x2 table; Newcombe, Stat. Med. 1998, 17:2635):
paired because both runs see the same images, which makes the interval much narrower than
the unpaired square-and-add one when the runs mostly agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.io import storage
from pipeline.io.certificates import part_location, read_parts, table_metadata
from scalecert.errors import InvalidOption, OutputConflict
from scalecert.methods.registry import method_info

Z95 = 1.959963984540054
NO_LABEL_NAME = "(no label)"


class ReportRefused(OutputConflict, ValueError):
    """The run cannot be reduced honestly (mixed fingerprints, rows that contradict the
    manifest, or two runs that are not of the same data)."""


@dataclass(frozen=True)
class Proportion:
    """``successes / n`` with its 95% interval (``lo``, ``hi``), all as fractions."""

    successes: int
    n: int
    value: float | None  # None when n == 0
    lo: float
    hi: float

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "successes": self.successes, "n": self.n,
                "ci95": [self.lo, self.hi]}


def wilson(successes: int, n: int, z: float = Z95) -> Proportion:
    """The Wilson score interval; ``n == 0`` gives value None and the uninformative [0, 1]."""
    if n == 0:
        return Proportion(0, 0, None, 0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Proportion(successes, n, p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Delta:
    """A paired difference new - old of two proportions over the same ``n`` items."""

    new: Proportion
    old: Proportion
    delta: float
    lo: float
    hi: float
    lost: int  # success in old, failure in new
    gained: int  # failure in old, success in new

    def to_dict(self) -> dict[str, Any]:
        return {"new": self.new.to_dict(), "old": self.old.to_dict(), "delta": self.delta,
                "ci95": [self.lo, self.hi], "lost": self.lost, "gained": self.gained}


def newcombe_paired(new: np.ndarray, old: np.ndarray, z: float = Z95) -> Delta:
    """Newcombe's method 10 interval for new - old on paired booleans of equal length."""
    new, old = np.asarray(new, bool), np.asarray(old, bool)
    n = len(new)
    a = int(np.sum(new & old))
    b = int(np.sum(new & ~old))  # gained
    c = int(np.sum(~new & old))  # lost
    d = n - a - b - c
    p1, p2 = wilson(a + b, n, z), wilson(a + c, n, z)
    if n == 0 or p1.value is None or p2.value is None:
        return Delta(p1, p2, 0.0, -1.0, 1.0, 0, 0)
    delta = p1.value - p2.value
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator > 0 else 0.0
    l1, u1 = p1.value - p1.lo, p1.hi - p1.value
    l2, u2 = p2.value - p2.lo, p2.hi - p2.value
    lower = math.sqrt(max(0.0, l1 * l1 - 2 * phi * l1 * u2 + u2 * u2))
    upper = math.sqrt(max(0.0, u1 * u1 - 2 * phi * u1 * l2 + l2 * l2))
    return Delta(p1, p2, delta, max(-1.0, delta - lower), min(1.0, delta + upper), c, b)


@dataclass(frozen=True)
class MissingShard:
    index: int
    images: int
    first: str
    last: str


@dataclass(frozen=True)
class RunData:
    """A run's manifest and all its present rows (``rows``: a DataFrame of the Parquet
    schema), plus the shards the manifest lists that have no file."""

    location: str
    manifest: dict[str, Any]
    rows: pd.DataFrame
    missing: tuple[MissingShard, ...]

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(method, patch_px) in the manifest's order (patch sizes outer)."""
        methods = self.manifest["config"]["methods"]
        return [(method, int(px)) for px in self.manifest["patch_px"] for method in methods]

    @property
    def images(self) -> int:
        """Images the manifest lists (the denominator of every accuracy)."""
        return int(self.manifest["dataset"]["images"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("dataset", {}).get("class_names") or [])


def read_manifest(location: str, s3: storage.S3Options | None, required: tuple[str, ...],
                  command: str = "certify") -> dict[str, Any]:
    """``location``'s ``manifest.json``, refused when absent, not JSON or without a
    ``required`` key (``command``: the job that writes such folders, for the message)."""
    manifest_at = storage.join(location, "manifest.json")
    try:
        manifest = json.loads(storage.read_bytes(manifest_at, s3))
    except FileNotFoundError:
        raise ReportRefused(f"{location}: no manifest.json (not a `scalecert {command}` run "
                            "folder?)") from None
    except json.JSONDecodeError as exc:
        raise ReportRefused(f"{manifest_at}: not valid JSON ({exc})") from None
    for key in required:
        if key not in manifest:
            raise ReportRefused(f"{manifest_at}: no {key!r} entry")
    return manifest


def missing_shard(shard: dict[str, Any]) -> MissingShard:
    """The report entry of a shard the manifest lists but that has no file."""
    return MissingShard(int(shard["index"]), int(shard["images"]), shard.get("first", ""),
                        shard.get("last", ""))


def check_fingerprint(at: str, manifest: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Refuse the Parquet file ``at`` unless its ``metadata`` carries the manifest's
    fingerprint."""
    fingerprint = metadata.get("fingerprint")
    if fingerprint != manifest["fingerprint"]:
        raise ReportRefused(
            f"{at}: fingerprint {str(fingerprint)[:16]} differs from manifest.json's "
            f"{manifest['fingerprint'][:16]}: the shard belongs to another run (config, "
            "model or data); refusing to mix results")


def load_run(location: str, s3: storage.S3Options | None = None) -> RunData:
    """Read and check ``manifest.json`` and every shard of a run folder (local or s3://)."""
    manifest = read_manifest(location, s3, ("fingerprint", "run_id", "shards", "patch_px",
                                            "config", "dataset"))
    keys_per_image = len(manifest["patch_px"]) * len(manifest["config"]["methods"])

    def check(at: str, table: pa.Table, shard: dict[str, Any]) -> pa.Table:
        _check_shard(at, table, manifest, int(shard["index"]),
                     int(shard["images"]) * keys_per_image)
        return table

    tables, missing = read_shards(location, manifest, part_location, s3, check)
    rows = pa.concat_tables(tables).to_pandas() if tables else _empty_rows()
    duplicated = rows.duplicated(["image_id", "patch_px", "method"])
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        raise ReportRefused(f"{location}: image {first['image_id']} has more than one row for "
                            f"{first['method']} at {first['patch_px']} px")
    return RunData(location, manifest, rows, missing)


def read_shards(
    location: str, manifest: dict[str, Any], part_at: Callable[[str, int], str],
    s3: storage.S3Options | None,
    check: Callable[[str, pa.Table, dict[str, Any]], pa.Table],
) -> tuple[list[pa.Table], tuple[MissingShard, ...]]:
    """Every shard the manifest lists, read back from ``part_at(location, index)``: a present
    one must carry the manifest's fingerprint, then ``check(at, table, shard)`` refuses it or
    gives its rows as the report takes them; an absent one is *missing*. Certify and attack
    runs alike."""
    shards = manifest["shards"]
    locations = [part_at(location, int(shard["index"])) for shard in shards]
    tables: list[pa.Table] = []
    missing: list[MissingShard] = []
    for shard, at, table in zip(shards, locations, read_parts(locations, s3)):
        if table is None:
            missing.append(missing_shard(shard))
            continue
        check_fingerprint(at, manifest, table_metadata(table))
        tables.append(check(at, table, shard))
    return tables, tuple(missing)


def _empty_rows() -> pd.DataFrame:
    from pipeline.io.certificates import SCHEMA

    return SCHEMA.empty_table().to_pandas()


def check_shard_identity(at: str, table: pa.Table, manifest: dict[str, Any], index: int) -> None:
    """Refuse a shard file whose rows name another run_id than the manifest's or another
    shard than ``index``."""
    run_ids = set(table.column("run_id").to_pylist())
    if run_ids != {manifest["run_id"]}:
        raise ReportRefused(f"{at}: rows of run(s) {sorted(map(str, run_ids))}, manifest.json "
                            f"says {manifest['run_id']}")
    shards = set(table.column("shard").to_pylist())
    if shards != {index}:
        raise ReportRefused(f"{at}: rows say shard(s) {sorted(shards)}, expected {index}")


def _check_shard(at: str, table: pa.Table, manifest: dict[str, Any], index: int,
                 expected_rows: int) -> None:
    if table.num_rows != expected_rows:
        raise ReportRefused(f"{at}: {table.num_rows} rows, the manifest's plan gives "
                            f"{expected_rows} (images x patch sizes x methods)")
    check_shard_identity(at, table, manifest, index)
    wanted = {(int(px), m) for px in manifest["patch_px"] for m in manifest["config"]["methods"]}
    found = set(zip(table.column("patch_px").to_pylist(), table.column("method").to_pylist()))
    if found != wanted:
        raise ReportRefused(f"{at}: (patch_px, method) pairs {sorted(found)} differ from the "
                            f"manifest's {sorted(wanted)}")


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def group_rows(run: RunData, method: str, patch_px: int) -> pd.DataFrame:
    rows = run.rows
    return rows[(rows["method"] == method) & (rows["patch_px"] == patch_px)]


def outcomes(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """Per-row booleans (error rows False): correct / certified / alert."""
    ok = rows["status"] == "ok"
    return {
        "vanilla_accuracy": ok & (rows["vanilla_prediction"] == rows["label"]),
        "pruned_accuracy": ok & (rows["prediction"] == rows["label"]),
        "clean_accuracy": ok & (rows["clean_output"] == rows["label"]),
        "certified_accuracy": ok & rows["certified"].eq(True),
        "alert": ok & (rows["clean_output"] == -1),
    }


ACCURACIES = ("vanilla_accuracy", "pruned_accuracy", "clean_accuracy", "certified_accuracy")


def guarantee_of(run: RunData, method: str) -> str:
    """``detection`` or ``recovery``: what the method's certificates mean (the registry's)."""
    try:
        return method_info(method).guarantee
    except InvalidOption as exc:
        raise ReportRefused(f"{run.location}: {exc} (a run of another version?)") from None


def summarise_group(run: RunData, method: str, patch_px: int, worst: int = 10) -> dict[str, Any]:
    """The figures of one (method, patch_px) (see the module docstring)."""
    guarantee = guarantee_of(run, method)
    rows = group_rows(run, method, patch_px)
    n = run.images
    flags = outcomes(rows)
    ok_rows = rows[rows["status"] == "ok"]
    n_ok = len(ok_rows)
    evaluated = ok_rows["n_evaluated"].to_numpy(dtype=float)
    latency = ok_rows["latency_ms"].to_numpy(dtype=float)
    mean_latency = _mean(latency)
    values, counts = np.unique(evaluated.astype(int), return_counts=True)
    side = int(run.manifest.get("image_side") or 0)
    summary: dict[str, Any] = {
        "method": method, "guarantee": guarantee, "patch_px": patch_px,
        "patch_area_percent": 100.0 * patch_px ** 2 / side ** 2 if side else None,
        "images": n, "ok_images": n_ok, "error_images": len(rows) - n_ok,
        "missing_images": n - len(rows),
    }
    for name in ACCURACIES:
        summary[name] = wilson(int(flags[name].sum()), n).to_dict()
    summary["false_alert_rate"] = (None if guarantee == "recovery"
                                   else wilson(int(flags["alert"].sum()), n_ok).to_dict())
    summary["masks"] = {
        "per_image": int(ok_rows["n_masks"].max()) if n_ok else None,
        "evaluated_mean": _mean(evaluated), "evaluated_p50": _percentile(evaluated, 50),
        "evaluated_p95": _percentile(evaluated, 95),
        "histogram": [[int(v), int(c)] for v, c in zip(values, counts)],
    }
    summary["latency_ms"] = {"mean": mean_latency, "p50": _percentile(latency, 50),
                             "p95": _percentile(latency, 95)}
    summary["images_per_s"] = 1000.0 / mean_latency if mean_latency else None
    summary["worst_classes"] = worst_classes(run, rows, flags["certified_accuracy"], worst)
    summary["confidence_curve"] = (None if guarantee == "recovery"
                                   else confidence_curve(run, rows))
    return summary


CURVE_TAUS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.97, 0.99, 0.995, 0.999)
FALSE_ALERT_TARGET = 0.10


def confidence_curve(run: RunData, rows: pd.DataFrame) -> dict[str, Any] | None:
    """The clean / certified / false-alert trade-off over alert confidences (see the module
    docstring), and the least TAU of the grid whose false-alert rate is at most
    :data:`FALSE_ALERT_TARGET`; None for rows without confidences (recovery methods, runs of
    an earlier version)."""
    config = run.manifest["config"]
    if "min_confidence" not in rows or rows["min_confidence"].isna().all():
        return None
    run_tau = config.get("alert_confidence")
    margin = float(config.get("margin", 1e-3))
    ok = rows["status"] == "ok"
    n, n_ok = run.images, int(ok.sum())
    least = rows["min_confidence"].fillna(0.0)
    alert_at = rows["max_alert_confidence"].fillna(0.0)
    points = []
    for tau in CURVE_TAUS:
        if run_tau is not None and tau < run_tau:
            continue  # the run's certificates already hold TAU: lower ones are not in its rows
        alerts = ok & (alert_at >= tau)
        points.append({
            "tau": tau,
            "certified_accuracy": wilson(int((ok & rows["certified"].eq(True)
                                              & (least >= tau + margin / 2)).sum()), n).to_dict(),
            "clean_accuracy": wilson(int((ok & (rows["prediction"] == rows["label"])
                                          & ~alerts).sum()), n).to_dict(),
            "false_alert_rate": wilson(int(alerts.sum()), n_ok).to_dict(),
        })
    chosen = next((p for p in points if p["false_alert_rate"]["value"] is not None
                   and p["false_alert_rate"]["value"] <= FALSE_ALERT_TARGET), None)
    return {"exact": bool(config.get("full_map")), "run_alert_confidence": run_tau,
            "false_alert_target": FALSE_ALERT_TARGET, "at_target": chosen, "points": points}


def worst_classes(run: RunData, rows: pd.DataFrame, certified: pd.Series,
                  count: int) -> list[dict[str, Any]]:
    """Classes with the lowest certified accuracy (over their rows present; ties: more images
    first, then class index)."""
    names = run.class_names
    frame = pd.DataFrame({"label": rows["label"].astype(int), "certified": certified.astype(int)})
    stats = frame.groupby("label")["certified"].agg(["sum", "count"]).reset_index()
    table = []
    for label, hits, total in stats.itertuples(index=False):
        label = int(label)
        name = NO_LABEL_NAME if label < 0 else (names[label] if label < len(names) else str(label))
        table.append({"label": label, "name": name,
                      "certified_accuracy": wilson(int(hits), int(total)).to_dict()})
    table.sort(key=lambda r: (r["certified_accuracy"]["value"], -r["certified_accuracy"]["n"],
                              r["label"]))
    return table[:count]


def error_items(run: RunData) -> list[dict[str, Any]]:
    """One entry per image with error rows: image_id, label, reason (sorted by image_id)."""
    errors = run.rows[run.rows["status"] == "error"].drop_duplicates("image_id")
    return [{"image_id": r.image_id, "label": int(r.label), "error": r.error}
            for r in errors.sort_values("image_id").itertuples(index=False)]


def clean_alerts(run: RunData) -> list[dict[str, Any]]:
    """Every ok row that alerts on its clean image: image, group, label, M(x), alert box."""
    rows = run.rows
    alerts = rows[(rows["status"] == "ok") & (rows["clean_output"] == -1)]
    items = []
    for r in alerts.sort_values(["image_id", "patch_px", "method"]).itertuples(index=False):
        box = None if r.alert_box is None else [int(v) for v in r.alert_box]
        items.append({"image_id": r.image_id, "method": r.method, "patch_px": int(r.patch_px),
                      "label": int(r.label), "prediction": int(r.prediction), "alert_box": box})
    return items


def diff_runs(new: RunData, old: RunData, max_drop_pp: float) -> dict[str, Any]:
    """Audit diff of two runs over the same images: per shared (method, patch_px), paired
    deltas of every accuracy with Newcombe intervals, the images that lost or gained
    certification, and ``failed`` when certified accuracy dropped by more than
    ``max_drop_pp`` percentage points (point estimate) anywhere."""
    for run in (new, old):
        if run.missing:
            raise ReportRefused(f"{run.location}: shards {[m.index for m in run.missing]} are "
                                "missing; an audit diff needs complete runs")
    new_labels = dict(zip(new.rows["image_id"], new.rows["label"]))
    old_labels = dict(zip(old.rows["image_id"], old.rows["label"]))
    if set(new_labels) != set(old_labels):
        only_new = sorted(set(new_labels) - set(old_labels))
        only_old = sorted(set(old_labels) - set(new_labels))
        raise ReportRefused(
            f"{new.location} and {old.location} are not runs of the same images: "
            f"{len(only_new)} only in the first (e.g. {only_new[:3]}), {len(only_old)} only in "
            f"the second (e.g. {only_old[:3]})")
    relabelled = sorted(i for i in new_labels if new_labels[i] != old_labels[i])
    if relabelled:
        raise ReportRefused(f"{new.location} and {old.location} label {len(relabelled)} images "
                            f"differently (e.g. {relabelled[:3]}): not the same data")
    shared = [g for g in new.groups if g in set(old.groups)]
    groups = []
    for method, px in shared:
        a = group_rows(new, method, px).set_index("image_id").sort_index()
        b = group_rows(old, method, px).set_index("image_id").sort_index()
        flags_new, flags_old = outcomes(a), outcomes(b)
        deltas = {name: newcombe_paired(flags_new[name].to_numpy(), flags_old[name].to_numpy())
                  for name in ACCURACIES}
        cert_new, cert_old = flags_new["certified_accuracy"], flags_old["certified_accuracy"]
        drop_pp = -100.0 * deltas["certified_accuracy"].delta
        groups.append({
            "method": method, "patch_px": px,
            **{name: delta.to_dict() for name, delta in deltas.items()},
            "certified_drop_pp": drop_pp, "failed": bool(drop_pp > max_drop_pp),
            "lost_certification": sorted(a.index[cert_old & ~cert_new].tolist()),
            "gained_certification": sorted(a.index[~cert_old & cert_new].tolist()),
        })
    return {
        "against": old.location, "against_run_id": old.manifest["run_id"],
        "against_fingerprint": old.manifest["fingerprint"], "max_drop_pp": max_drop_pp,
        "interval": "Newcombe method 10 (paired), 95%",
        "groups": groups,
        "groups_only_in_run": [list(g) for g in new.groups if g not in set(old.groups)],
        "groups_only_in_against": [list(g) for g in old.groups if g not in set(new.groups)],
        "failed": any(g["failed"] for g in groups),
    }
