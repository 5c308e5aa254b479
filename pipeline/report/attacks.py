"""The attack report: a ``scalecert attack`` run's rows reduced to empirical figures.

Reading (:func:`read_attack_run`) checks like the certify reducer (a failed check is
:class:`ReportRefused`, naming the file and what is wrong): ``manifest.json`` exists and says
``"job": "attack"``; every present ``attacks/part-NNNNN.parquet`` carries the manifest's
fingerprint in its metadata, its rows the manifest's run_id and the shard's index, the
manifest's image count and one row per (image_id, attack, patch_px, method) of one grid shared
by every image of the run (and, where the manifest names them, its patch sizes, methods and
attack); no part file lies outside the manifest's plan. Shards the manifest lists without a file
are *missing*: reported, never silently dropped.

Figures per (attack, attack_model, method, patch_px) (:func:`attack_figures`), each a 95%
Wilson interval (:func:`pipeline.report.reduce.wilson`). Attack figures describe what the
attack did to images that were attacked, so their denominators are ok rows (error rows are
counted apart); a null prediction in an ok row is never a success:
- ``undefended_success``: of ok rows with vanilla_prediction == label and an
  attacked_vanilla_prediction, those with attacked_vanilla_prediction != label;
- ``pruned_success``: of ok rows with prediction == label (M right on the clean image) and an
  attacked_prediction, those with attacked_prediction != label;
- ``alert_rate``: ok rows with detect_output == ALERT;
- ``defended_fooled``: ok rows whose detect_output is a label other than the label;
- ``localized``: of the alerts, those whose alert box covers the patch (localized is True);
- ``empirical_recovery``: ok rows whose final label (detect_output, or recovered_prediction
  after an ALERT; null is wrong) is the label;
- ``undefended_accuracy_attacked``: ok rows with attacked_vanilla_prediction == label (the
  paper's "accuracy under attack");
- ``violations``: every row with ``is_violation(certified, label, detect_output)`` (a
  certified image whose attacked version ends in neither its label nor ALERT), listed;
  ``certified``: ok rows certified; ``errors``: error rows; mean attack_steps, attack_loss and
  latency_ms over ok rows.

Error rows carry no attack_model (:func:`pipeline.io.attack_rows.attack_error_rows`): they are
put in the group of their (attack, method, patch_px) when the manifest or the ok rows name one
attack model for it, else in a group of attack model None.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import pyarrow as pa

from pipeline.io import storage
from pipeline.io.attack_rows import ALERT, ATTACK_SCHEMA, attack_part_location, is_violation
from pipeline.io.sources import dataset_name
from pipeline.report.html import _STYLE, PALETTE, _e, _Frame
from pipeline.report.published import PublishedAttackRow, comparable, load_published_attacks
from pipeline.report.reduce import (MissingShard, Proportion, ReportRefused, check_shard_identity,
                                    read_manifest, read_shards, wilson)
from pipeline.report.text import model_provenance, num, pct, preprocessing_text
from pipeline.report.write import write_documents

SCHEMA_VERSION = "scalecert-attack-report/1"
ROW_KEY = ("image_id", "attack", "patch_px", "method")
RATES = ("undefended_success", "pruned_success", "alert_rate", "defended_fooled", "localized",
         "empirical_recovery", "undefended_accuracy_attacked")
TITLES = (
    ("undefended_success", "undefended model fooled"),
    ("pruned_success", "pruned model fooled"),
    ("alert_rate", "alerts"),
    ("defended_fooled", "defense fooled (wrong label, no alert)"),
    ("localized", "alerts localizing the patch"),
    ("empirical_recovery", "empirical recovery"),
    ("undefended_accuracy_attacked", "undefended accuracy under attack"),
)
DEFINITIONS = (
    ("undefended_success", "attacked_vanilla_prediction != label, over ok rows with "
                           "vanilla_prediction == label (and an attacked prediction)"),
    ("pruned_success", "attacked_prediction != label, over ok rows with prediction == label "
                       "(M right on the clean image; and an attacked prediction)"),
    ("alert_rate", "detect_output == ALERT (-1), over ok rows"),
    ("defended_fooled", "detect_output a label other than the label (no alert), over ok rows"),
    ("localized", "localized (the alert box covers the patch), over ok rows that alert"),
    ("empirical_recovery", "final label == label, over ok rows; the final label is "
                           "detect_output, or recovered_prediction after an ALERT (null: wrong)"),
    ("undefended_accuracy_attacked", "attacked_vanilla_prediction == label, over ok rows (the "
                                     "paper's accuracy under attack)"),
    ("violations", "rows with is_violation(certified, label, detect_output): certified, and "
                   "detect_output neither the label nor ALERT"),
    ("certified", "ok rows whose clean image is certified (same run, same options)"),
    ("nulls", "a null prediction in an ok row is never a success"),
    ("ci95", "95% Wilson score interval"),
)
FIGURE_COLUMNS = ("image_id", "label", "status", "attack", "attack_model", "method", "patch_px",
                  "patch_box", "vanilla_prediction", "prediction", "certified",
                  "attacked_vanilla_prediction", "attacked_prediction", "detect_output",
                  "localized", "recovered_prediction", "attack_loss", "attack_steps",
                  "latency_ms")
NO_VIOLATIONS = "0 violations: no certified image was fooled"
RATE_COLOURS = (*PALETTE, "#8c564b")  # one per rate of RATES


@dataclass(frozen=True)
class AttackRunData:
    """An attack run folder as the report reads it (the attack side of
    :class:`~pipeline.report.reduce.RunData`): its manifest, its present rows
    (:data:`ATTACK_SCHEMA`) and the shards the manifest lists that have no file."""

    location: str
    manifest: dict[str, Any]
    table: pa.Table
    missing: tuple[MissingShard, ...]

    @property
    def images(self) -> int:
        """Images the manifest lists."""
        return int(self.manifest["dataset"]["images"])


@dataclass(frozen=True)
class Violation:
    """A certified image whose attacked version ended in a wrong label without ALERT."""

    image_id: str
    label: int
    detect_output: int
    patch_box: tuple[int, ...] | None
    attack: str
    attack_model: str | None
    method: str
    patch_px: int

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "label": self.label,
                "detect_output": self.detect_output,
                "patch_box": None if self.patch_box is None else list(self.patch_box),
                "attack": self.attack, "attack_model": self.attack_model,
                "method": self.method, "patch_px": self.patch_px}


@dataclass(frozen=True)
class AttackGroup:
    """The figures of one (attack, attack_model, method, patch_px) (module docstring)."""

    attack: str
    attack_model: str | None
    method: str
    patch_px: int
    rows: int
    ok: int
    errors: int
    certified: int
    undefended_success: Proportion
    pruned_success: Proportion
    alert_rate: Proportion
    defended_fooled: Proportion
    localized: Proportion
    empirical_recovery: Proportion
    undefended_accuracy_attacked: Proportion
    violations: tuple[Violation, ...]
    mean_attack_steps: float | None
    mean_attack_loss: float | None
    mean_latency_ms: float | None

    @property
    def violation_count(self) -> int:
        return len(self.violations)

    @property
    def label(self) -> str:
        """``per-image vs defended, scalecert, 5 px``: the group as the tables name it."""
        return f"{self.attack} vs {self.attack_model or '?'}, {self.method}, {self.patch_px} px"

    def rates(self) -> dict[str, Proportion]:
        """The seven proportions, in :data:`RATES` order."""
        return {name: getattr(self, name) for name in RATES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "attack_model": self.attack_model, "method": self.method,
            "patch_px": self.patch_px, "rows": self.rows, "ok": self.ok, "errors": self.errors,
            "certified": self.certified,
            **{name: p.to_dict() for name, p in self.rates().items()},
            "violations": [v.to_dict() for v in self.violations],
            "violation_count": self.violation_count,
            "mean_attack_steps": self.mean_attack_steps,
            "mean_attack_loss": self.mean_attack_loss, "mean_latency_ms": self.mean_latency_ms,
        }


# --- reading ------------------------------------------------------------------------------------

def read_attack_run(out: str, s3: storage.S3Options | None = None) -> AttackRunData:
    """Read and check ``manifest.json`` and every ``attacks/part-*.parquet`` of an attack run
    folder (local or s3://); see the module docstring for the checks."""
    manifest = read_manifest(out, s3, ("fingerprint", "run_id", "shards", "dataset"),
                             command="attack")
    if manifest.get("job") != "attack":
        raise ReportRefused(f"{storage.join(out, 'manifest.json')}: job {manifest.get('job')!r}, "
                            "not 'attack': not a `scalecert attack` run folder")
    grid: set[tuple[str, int, str]] | None = None

    def check(at: str, table: pa.Table, shard: dict[str, Any]) -> pa.Table:
        nonlocal grid
        table = _conform(at, table)
        check_shard_identity(at, table, manifest, int(shard["index"]))
        keys = _check_attack_shard(at, table, manifest, int(shard["images"]))
        if keys and grid is None:
            grid = keys
        elif keys and keys != grid:
            raise ReportRefused(f"{at}: (attack, patch_px, method) grid {sorted(keys)} differs "
                                f"from the other shards' {sorted(grid or ())}")
        return table

    tables, missing = read_shards(out, manifest, attack_part_location, s3, check)
    _refuse_strays(out, manifest, s3)
    rows = pa.concat_tables(tables) if tables else ATTACK_SCHEMA.empty_table()
    frame = rows.select(list(ROW_KEY)).to_pandas()
    duplicated = frame.duplicated(list(ROW_KEY))
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ReportRefused(f"{out}: image {first['image_id']} has more than one row for "
                            f"{first['attack']} / {first['method']} at {first['patch_px']} px "
                            "(in two shards)")
    model = (manifest.get("attack") or {}).get("attack_model")
    return AttackRunData(out, manifest, _fill_attack_model(rows, model), missing)


def _conform(at: str, table: pa.Table) -> pa.Table:
    """The file's rows in :data:`ATTACK_SCHEMA` (its metadata dropped); refused when columns
    are missing or of another type."""
    absent = [name for name in ATTACK_SCHEMA.names if name not in table.column_names]
    if absent:
        raise ReportRefused(f"{at}: no column(s) {', '.join(absent)}: not attack rows of this "
                            "version")
    try:
        return table.select(ATTACK_SCHEMA.names).cast(ATTACK_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ReportRefused(f"{at}: columns do not fit the attack schema ({exc})") from None


def _check_attack_shard(at: str, table: pa.Table, manifest: dict[str, Any],
                        images: int) -> set[tuple[str, int, str]]:
    """Refuse a shard whose rows contradict the manifest; its (attack, patch_px, method) grid."""
    frame = table.select([*ROW_KEY, "status", "attack_model"]).to_pandas()
    unkeyed = frame[list(ROW_KEY)].isna().any(axis=1)
    if unkeyed.any():
        raise ReportRefused(f"{at}: {int(unkeyed.sum())} rows without image_id, attack, "
                            "patch_px or method")
    found = frame["image_id"].nunique()
    if found != images:
        raise ReportRefused(f"{at}: rows of {found} images, the manifest's plan gives {images}")
    duplicated = frame.duplicated(list(ROW_KEY))
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ReportRefused(f"{at}: image {first['image_id']} has more than one row for "
                            f"{first['attack']} / {first['method']} at {first['patch_px']} px")
    keys = {(str(a), int(px), str(m))
            for a, px, m in zip(frame["attack"], frame["patch_px"], frame["method"])}
    if len(frame) != images * len(keys):
        raise ReportRefused(f"{at}: {len(frame)} rows, {images} images x {len(keys)} (attack, "
                            f"patch_px, method) give {images * len(keys)}: some images lack rows")
    statuses = set(frame["status"]) - {"ok", "error"}
    if statuses:
        raise ReportRefused(f"{at}: status(es) {sorted(map(str, statuses))}, expected ok or error")
    options = manifest.get("attack") or {}
    expected = {
        "patch_px": {int(px) for px in manifest.get("patch_px") or ()},
        "method": set((manifest.get("config") or {}).get("methods") or ()),
        "attack": {options["attack"]} if options.get("attack") else set(),
    }
    position = {"attack": 0, "patch_px": 1, "method": 2}
    for name, wanted in expected.items():
        seen = {key[position[name]] for key in keys}
        if wanted and keys and seen != wanted:
            raise ReportRefused(f"{at}: {name} {sorted(seen)} differ from the manifest's "
                                f"{sorted(wanted)}")
    model = options.get("attack_model")
    ok_models = set(frame.loc[frame["status"] == "ok", "attack_model"])
    if model and ok_models - {model}:
        raise ReportRefused(f"{at}: ok rows attacked model(s) {sorted(map(str, ok_models))}, "
                            f"the manifest's attack_model is {model}")
    return keys


def _refuse_strays(out: str, manifest: dict[str, Any], s3: storage.S3Options | None) -> None:
    """Refuse part files the manifest's plan does not list (rows it would silently skip)."""
    folder = storage.join(out, "attacks")
    if not storage.exists(folder, s3):
        return
    listed = {f"part-{int(s['index']):05d}.parquet" for s in manifest["shards"]}
    strays = [name for name in storage.list_files(folder, s3)
              if name.startswith("part-") and name.endswith(".parquet") and name not in listed]
    if strays:
        raise ReportRefused(f"{storage.join(folder, strays[0])}: not a shard of the manifest's "
                            f"plan ({len(manifest['shards'])} shards); refusing to leave rows out")


def _fill_attack_model(rows: pa.Table, model: str | None = None) -> pa.Table:
    """Error rows' null attack_model filled with ``model`` or, failing that, with the one
    attack model the ok rows of the same (attack, method, patch_px) name."""
    columns = {name: rows.column(name).to_pylist()
               for name in ("attack", "method", "patch_px", "attack_model")}
    named: dict[tuple[Any, Any, Any], set[str]] = {}
    for a, m, px, am in zip(columns["attack"], columns["method"], columns["patch_px"],
                            columns["attack_model"]):
        if am is not None:
            named.setdefault((a, m, px), set()).add(am)
    filled = []
    for a, m, px, am in zip(columns["attack"], columns["method"], columns["patch_px"],
                            columns["attack_model"]):
        known = named.get((a, m, px), set())
        filled.append(am if am is not None else
                      model if model else next(iter(known)) if len(known) == 1 else None)
    if filled == columns["attack_model"]:
        return rows
    index = rows.schema.get_field_index("attack_model")
    return rows.set_column(index, rows.schema.field(index), pa.array(filled, pa.string()))


# --- figures ------------------------------------------------------------------------------------

def attack_figures(table: pa.Table | pd.DataFrame) -> list[AttackGroup]:
    """The figures of every (attack, attack_model, method, patch_px) of ``table`` (attack rows,
    :data:`ATTACK_SCHEMA`), sorted by attack, attack model, method and patch size."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=ATTACK_SCHEMA, preserve_index=False)
    table = _fill_attack_model(table)
    columns = {name: table.column(name).to_pylist() for name in FIGURE_COLUMNS}
    members: dict[tuple[Any, Any, Any, Any], list[int]] = {}
    for i, key in enumerate(zip(columns["attack"], columns["attack_model"], columns["method"],
                                columns["patch_px"])):
        members.setdefault(key, []).append(i)
    order = sorted(members, key=lambda k: (str(k[0] or ""), str(k[1] or ""), str(k[2] or ""),
                                           int(k[3] or 0)))
    return [_group(key, [{name: columns[name][i] for name in columns} for i in members[key]])
            for key in order]


def _share(rows: Sequence[dict[str, Any]], among: Callable[[dict[str, Any]], bool],
           success: Callable[[dict[str, Any]], bool]) -> Proportion:
    """Wilson interval of ``success`` over the rows satisfying ``among``."""
    pool = [r for r in rows if among(r)]
    return wilson(sum(1 for r in pool if success(r)), len(pool))


def final_label(row: dict[str, Any]) -> int | None:
    """What the defense ends with on the attacked image: detect_output, or the recovered
    prediction (occluding the alert box) after an ALERT."""
    return row["recovered_prediction"] if row["detect_output"] == ALERT else row["detect_output"]


def _mean(values: Iterable[float | int | None]) -> float | None:
    """Mean of the finite values; None when there are none."""
    known = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(known) / len(known) if known else None


def _every(row: dict[str, Any]) -> bool:
    return True


def _group(key: tuple[Any, Any, Any, Any], rows: list[dict[str, Any]]) -> AttackGroup:
    attack, attack_model, method, patch_px = key
    ok = [r for r in rows if r["status"] == "ok"]
    violations = tuple(
        Violation(str(r["image_id"]), int(r["label"]), int(r["detect_output"]),
                  None if r["patch_box"] is None else tuple(int(v) for v in r["patch_box"]),
                  str(attack), attack_model, str(method), int(patch_px))
        for r in sorted(rows, key=lambda r: str(r["image_id"]))
        if is_violation(r["certified"], r["label"], r["detect_output"]))
    return AttackGroup(
        attack=str(attack), attack_model=attack_model, method=str(method),
        patch_px=int(patch_px), rows=len(rows), ok=len(ok), errors=len(rows) - len(ok),
        certified=sum(1 for r in ok if r["certified"] is True),
        undefended_success=_share(
            ok, lambda r: r["vanilla_prediction"] == r["label"]
            and r["attacked_vanilla_prediction"] is not None,
            lambda r: r["attacked_vanilla_prediction"] != r["label"]),
        pruned_success=_share(
            ok, lambda r: r["prediction"] == r["label"] and r["attacked_prediction"] is not None,
            lambda r: r["attacked_prediction"] != r["label"]),
        alert_rate=_share(ok, _every, lambda r: r["detect_output"] == ALERT),
        defended_fooled=_share(ok, _every, lambda r: r["detect_output"] is not None
                               and r["detect_output"] not in (r["label"], ALERT)),
        localized=_share(ok, lambda r: r["detect_output"] == ALERT,
                         lambda r: r["localized"] is True),
        empirical_recovery=_share(ok, _every, lambda r: final_label(r) is not None
                                  and final_label(r) == r["label"]),
        undefended_accuracy_attacked=_share(
            ok, _every, lambda r: r["attacked_vanilla_prediction"] is not None
            and r["attacked_vanilla_prediction"] == r["label"]),
        violations=violations,
        mean_attack_steps=_mean(r["attack_steps"] for r in ok),
        mean_attack_loss=_mean(r["attack_loss"] for r in ok),
        mean_latency_ms=_mean(r["latency_ms"] for r in ok),
    )


def violation_lines(figures: Sequence[AttackGroup]) -> list[str]:
    """One line per violation, for the command to print."""
    return [f"VIOLATION {v.image_id} (label {v.label}): certified, yet {v.attack} attack on "
            f"{v.attack_model or '?'} model, {v.method} at {v.patch_px} px: detection returned "
            f"{v.detect_output} without ALERT (patch box {_box(v.patch_box)})"
            for g in figures for v in g.violations]


def _box(box: tuple[int, ...] | None) -> str:
    return "n/a" if box is None else str(list(box))


# --- the document -------------------------------------------------------------------------------

def _published(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The published attack figures, each with ``comparable`` (same image side and class
    count as the run) and ``title_figure`` (the figure's name in the tables)."""
    side = int(manifest.get("image_side") or 0)
    classes = int((manifest.get("dataset") or {}).get("classes") or 0)
    titles = dict(TITLES)
    rows: tuple[PublishedAttackRow, ...] = load_published_attacks()
    return [{**row.to_dict(), "comparable": comparable(row, side, classes),
             "title_figure": titles[row.figure]} for row in rows]


def build_attack_report(run: AttackRunData, figures: Sequence[AttackGroup]) -> dict[str, Any]:
    """attack_report.json (``schema = "scalecert-attack-report/1"``): run, completeness,
    definitions, groups (every figure as value, low, high, n, successes; the group's
    violations listed and counted), violations (count, items: all groups'), published
    (labelled ``published: true``, never measured here)."""
    manifest = run.manifest
    dataset = manifest.get("dataset") or {}
    violations = [v.to_dict() for g in figures for v in g.violations]
    return {
        "schema": SCHEMA_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {
            "location": run.location, "run_id": manifest["run_id"], "job": manifest["job"],
            "fingerprint": manifest["fingerprint"], "attack": manifest.get("attack"),
            "model": (manifest.get("config") or {}).get("model"),
            "checkpoint_sha256": manifest.get("checkpoint_sha256"),
            "source_sha256": manifest.get("source_sha256"),
            "package_versions": manifest.get("package_versions"),
            "preprocessing": manifest.get("preprocessing"),
            "version": manifest.get("version"), "created": manifest.get("created"),
            "image_side": manifest.get("image_side"),
            "dataset": {"source": dataset.get("source"),
                        "name": dataset_name(dataset.get("source") or ""),
                        "classes": dataset.get("classes"), "images": dataset.get("images")},
        },
        "completeness": _completeness(manifest, run.missing),
        "definitions": dict(DEFINITIONS),
        "groups": [g.to_dict() for g in figures],
        "violations": {"count": len(violations), "items": violations},
        "published": _published(manifest),
    }


def _completeness(manifest: dict[str, Any], missing: Sequence[MissingShard]) -> dict[str, Any]:
    listed = len(manifest.get("shards") or ())
    return {"complete": not missing, "shards_listed": listed,
            "shards_present": listed - len(missing), "missing_shards": [vars(m) for m in missing],
            "images_missing": sum(m.images for m in missing)}


def _attack_summary(manifest: dict[str, Any]) -> str:
    options = manifest.get("attack") or {}
    return ", ".join(f"{k} {v}" for k, v in options.items() if v is not None) or "not recorded"


def _pct(p: Proportion) -> str:
    return pct(p.to_dict())


def render_attack_markdown(figures: Sequence[AttackGroup], manifest: dict[str, Any],
                           missing: Sequence[MissingShard] = ()) -> str:
    """attack_report.md: the figures as tables, the published Section 4.4 figures in their own
    table labelled published, the violations and any missing shards."""
    dataset = manifest.get("dataset") or {}
    comp = _completeness(manifest, missing)
    out = [f"# ScaleCert attack report: run {manifest.get('run_id')}", "",
           f"- attack: {_attack_summary(manifest)}",
           f"- model `{(manifest.get('config') or {}).get('model')}`"
           f"{model_provenance(manifest)}, data "
           f"`{dataset.get('source')}` ({dataset.get('images')} images listed, "
           f"{manifest.get('image_side')} px)"
           + (f"; preprocessing {text}"
              if (text := preprocessing_text(manifest.get("preprocessing"))) else ""),
           f"- shards: {comp['shards_present']} of {comp['shards_listed']} present"
           + ("" if comp["complete"] else f"; **{len(missing)} MISSING "
              f"({comp['images_missing']} images without attack rows, in no figure)**"), "",
           "## Measured", "",
           "Rates over ok rows (error rows counted apart) with 95% Wilson intervals [low, high]; "
           "the attack success rates over the ok rows the model got right on the clean image, "
           "localized over alerts. Definitions in attack_report.json.", "",
           "| attack | attacked model | method | patch | rows | errors | "
           + " | ".join(title for _, title in TITLES) + " | certified | violations |",
           "|" + "---|" * (len(TITLES) + 8)]
    for g in figures:
        out.append(f"| {g.attack} | {g.attack_model or 'n/a'} | {g.method} | {g.patch_px} px | "
                   f"{g.rows} | {g.errors} | "
                   + " | ".join(_pct(p) for p in g.rates().values())
                   + f" | {g.certified} | {g.violation_count} |")
    out += ["", "| attack | attacked model | method | patch | mean attack steps | "
            "mean attack loss | mean latency ms |", "|---|---|---|---|---|---|---|"]
    out += [f"| {g.attack} | {g.attack_model or 'n/a'} | {g.method} | {g.patch_px} px | "
            f"{num(g.mean_attack_steps)} | {num(g.mean_attack_loss, 3)} | "
            f"{num(g.mean_latency_ms, 2)} |" for g in figures]
    out += ["", "## Published (not measured here)", "",
            "The paper's own figures, for context: compare each with the measured column of "
            "the same name, mindful of its model, data and patch.", "",
            "| published | figure | value | model | dataset | patch | comparable with this run "
            "| source |", "|---|---|---|---|---|---|---|---|"]
    for p in _published(manifest):
        out.append(f"| published | {p['title_figure']} | {p['value']:.1f}% | {p['model']} | "
                   f"{p['dataset']} | {p['patch_area_percent']:g}% ({p['patch_px']} px) | "
                   f"{'yes' if p['comparable'] else 'no (other image size or classes)'} | "
                   f"[{p['citation']}]({p['url']}): {p['note']} |")
    out += ["", "## Violations", ""] + _violations_markdown(figures)
    if missing:
        out += ["", "## Missing shards", "", "| shard | images | first | last |",
                "|---|---|---|---|"]
        out += [f"| {m.index} | {m.images} | {m.first} | {m.last} |" for m in missing]
    return "\n".join(out) + "\n"


def _violations_markdown(figures: Sequence[AttackGroup]) -> list[str]:
    violations = [v for g in figures for v in g.violations]
    if not violations:
        return [NO_VIOLATIONS + "."]
    out = [f"**{len(violations)} violations**: certified images whose attacked version ended "
           "in a wrong label without ALERT (the detection theorem says this cannot happen).", "",
           "| image | label | detect output | patch box | attack | attacked model | method | "
           "patch |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| `{v.image_id}` | {v.label} | {v.detect_output} | "
            f"{_box(v.patch_box)} | {v.attack} | "
            f"{v.attack_model or 'n/a'} | {v.method} | {v.patch_px} px |" for v in violations]
    return out


# --- HTML ---------------------------------------------------------------------------------------

def rates_plot(figures: Sequence[AttackGroup]) -> str:
    """``svg#plot-attack-rates``: one bar per rate and group (%, 95% Wilson interval as a
    whisker); a rate with no rows has no bar."""
    per = len(RATES)
    frame = _Frame(x_max=max(len(figures), 1),
                   width=max(720, 60 + 230 + len(figures) * (per * 12 + 24)))
    top, plot_h, width, right = frame.top, frame.plot_h, frame.width, frame.right
    parts = frame.opening("plot-attack-rates", "attack figures per group", "group",
                          "share of rows")
    bar = 0.8 / per
    for index, group in enumerate(figures):
        parts.append(f'<text x="{frame.sx(index + 0.5):.1f}" y="{top + plot_h + 16}" '
                     f'font-size="10" text-anchor="middle">{_e(group.attack)} '
                     f'{_e(group.method)} {group.patch_px}px<title>{_e(group.label)}</title>'
                     '</text>')
        for k, (name, title) in enumerate(TITLES):
            p = getattr(group, name)
            if p.value is None:
                continue
            colour = RATE_COLOURS[k % len(RATE_COLOURS)]
            x0, x1 = frame.sx(index + 0.1 + k * bar), frame.sx(index + 0.1 + (k + 1) * bar)
            middle = (x0 + x1) / 2
            y = frame.sy(p.value)
            parts.append(
                f'<g class="rate-bar" data-rate="{name}" data-group="{_e(group.label)}">'
                f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                f'height="{frame.sy(0) - y:.1f}" fill="{colour}"><title>{_e(title)}, '
                f'{_e(group.label)}: {_e(_pct(p))}, n = {p.n}</title></rect>'
                f'<line class="ci-bar" x1="{middle:.1f}" x2="{middle:.1f}" '
                f'y1="{frame.sy(p.lo):.1f}" y2="{frame.sy(p.hi):.1f}" stroke="#222"/></g>')
    legend_y = top + 10
    for k, (_, title) in enumerate(TITLES):
        colour = RATE_COLOURS[k % len(RATE_COLOURS)]
        parts.append(f'<rect x="{width - right + 14}" y="{legend_y - 6}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{width - right + 30}" y="{legend_y + 4}" '
                     f'font-size="11">{_e(title)}</text>')
        legend_y += 18
    parts.append(f'<text x="{width - right + 14}" y="{frame.height - 30}" font-size="11" '
                 'fill="#555">whiskers: 95% Wilson interval</text>')
    return "".join(parts) + "</svg>"


def render_attack_html(figures: Sequence[AttackGroup], manifest: dict[str, Any],
                       missing: Sequence[MissingShard] = ()) -> str:
    """attack_report.html: one self-contained page (inline CSS and SVG, no scripts, no
    network) with the tables of :func:`render_attack_markdown` and the rates plot."""
    dataset = manifest.get("dataset") or {}
    comp = _completeness(manifest, missing)
    run_id = _e(manifest.get("run_id"))
    body = [f"<h1>ScaleCert attack report: run {run_id}</h1>",
            f"<p>attack: {_e(_attack_summary(manifest))}; model <code>"
            f"{_e((manifest.get('config') or {}).get('model'))}</code>"
            f"{_e(model_provenance(manifest))}, data <code>"
            f"{_e(dataset.get('source'))}</code>, {_e(dataset.get('images'))} images listed, "
            f"{_e(manifest.get('image_side'))} px; shards {comp['shards_present']} of "
            f"{comp['shards_listed']}.</p>"]
    if missing:
        body.append(f'<p class="warn">{len(missing)} shards missing: {comp["images_missing"]} '
                    "images have no attack rows and are in no figure.</p>")
    columns = ["attack", "attacked model", "method", "patch", "rows", "errors",
               *(title for _, title in TITLES), "certified", "violations", "mean attack steps",
               "mean attack loss", "mean latency ms"]
    rows = []
    for g in figures:
        cells = [g.attack, g.attack_model or "n/a", g.method, f"{g.patch_px} px", g.rows,
                 g.errors, *(_pct(p) for p in g.rates().values()), g.certified,
                 g.violation_count, num(g.mean_attack_steps), num(g.mean_attack_loss, 3),
                 num(g.mean_latency_ms, 2)]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    body += ["<h2>Measured</h2>",
             '<table id="attack-measured"><tr>' + "".join(f"<th>{_e(c)}</th>" for c in columns)
             + "</tr>" + "".join(rows) + "</table>",
             "<p>Rates over ok rows (error rows counted apart), [95% Wilson interval]; attack "
             "success over the ok rows the model got right on the clean image; localized over "
             "alerts.</p>", _published_html(manifest),
             "<h2>Rates per group</h2>", rates_plot(figures)]
    body += _violations_html(figures)
    if missing:
        body.append('<h2 class="warn">Missing shards</h2><table id="missing"><tr><th>shard</th>'
                    "<th>images</th><th>first</th><th>last</th></tr>" + "".join(
                        f"<tr><td>{m.index}</td><td>{m.images}</td><td>{_e(m.first)}</td>"
                        f"<td>{_e(m.last)}</td></tr>" for m in missing) + "</table>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ScaleCert attack report {run_id}</title><style>{_STYLE}</style></head>"
            "<body>" + "\n".join(body) + "</body></html>\n")


def _published_html(manifest: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr class=\"published\"><td>published</td><td>{_e(p['title_figure'])}</td>"
        f"<td>{p['value']:.1f}%</td><td>{_e(p['model'])}</td><td>{_e(p['dataset'])}</td>"
        f"<td>{p['patch_area_percent']:g}% ({p['patch_px']} px)</td>"
        f"<td>{'yes' if p['comparable'] else 'no (other image size or classes)'}</td>"
        f"<td><a href=\"{_e(p['url'])}\">{_e(p['citation'])}</a>: {_e(p['note'])}</td></tr>"
        for p in _published(manifest))
    return ("<h3>Published results (not measured here)</h3><table id=\"attack-published\"><tr>"
            "<th></th><th>figure</th><th>value</th><th>model</th><th>dataset</th><th>patch</th>"
            "<th>comparable with this run</th><th>source</th></tr>" + rows + "</table>")


def _violations_html(figures: Sequence[AttackGroup]) -> list[str]:
    violations = [v for g in figures for v in g.violations]
    if not violations:
        return ["<h2>Violations</h2>", f'<p id="no-violations">{NO_VIOLATIONS}.</p>']
    rows = "".join(
        f"<tr><td>{_e(v.image_id)}</td><td>{v.label}</td><td>{v.detect_output}</td>"
        f"<td>{_e(_box(v.patch_box))}</td><td>{_e(v.attack)}</td>"
        f"<td>{_e(v.attack_model or 'n/a')}</td><td>{_e(v.method)}</td><td>{v.patch_px} px</td>"
        "</tr>" for v in violations)
    return [f'<h2 class="warn">Violations ({len(violations)})</h2>',
            "<p>Certified images whose attacked version ended in a wrong label without ALERT "
            "(the detection theorem says this cannot happen).</p>"
            '<table id="violations"><tr><th>image</th><th>label</th><th>detect output</th>'
            "<th>patch box</th><th>attack</th><th>attacked model</th><th>method</th>"
            f"<th>patch</th></tr>{rows}</table>"]


def write_attack_report(out_dir: str, run: AttackRunData, figures: Sequence[AttackGroup],
                        s3: storage.S3Options | None = None) -> list[str]:
    """Write attack_report.json, attack_report.md and attack_report.html into ``out_dir``
    (local or s3://); their locations."""
    return list(write_documents(
        out_dir, "attack_report", build_attack_report(run, figures),
        render_attack_markdown(figures, run.manifest, run.missing),
        render_attack_html(figures, run.manifest, run.missing), s3))
