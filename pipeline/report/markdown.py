"""report.md: the report document as Markdown tables."""

from __future__ import annotations

from typing import Any

from pipeline.report.reduce import ACCURACIES
from pipeline.report.text import (
    layout_note, model_provenance, num, pct, preprocessing_text, settings_text, signed_pp,
)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the same content as report.json, as tables."""
    run, comp = report["run"], report["completeness"]
    out = [f"# ScaleCert report: run {run['run_id']}", "",
           f"- model `{run['model']}`, checkpoint sha256 `{str(run['checkpoint_sha256'])[:16]}`"
           + model_provenance(run),
           f"- data `{run['dataset']['source']}` ({run['dataset']['images']} images listed, "
           f"{run['image_side']} px)"
           + (f"; preprocessing {text}" if (text := preprocessing_text(run.get("preprocessing")))
              else ""),
           f"- settings: {settings_text(run.get('config') or {})}",
           f"- shards: {comp['shards_present']} of {comp['shards_listed']} present"
           + ("" if comp["complete"] else f"; **{len(comp['missing_shards'])} MISSING "
              f"({comp['images_missing']} images counted as not certified)**"),
           f"- errors: {report['errors']['images']} images with status error (counted as not "
           "correct, not certified)", "",
           "## Measured", "",
           "Accuracies over all listed images with 95% Wilson intervals; false alerts over ok rows.",
           ""]
    for guarantee in ("detection", "recovery"):
        out += _groups_markdown([g for g in report["groups"] if g["guarantee"] == guarantee],
                                guarantee)
    out += ["images/s = 1000 / mean latency_ms (per-worker, from the rows).", ""]
    if report["published"]:
        out += ["## Published (not measured here)", "",
                "| published | defense | model | dataset | patch | clean | certified | kind | source |",
                "|---|---|---|---|---|---|---|---|---|"]
        for p in report["published"]:
            out.append(f"| published | {p['defense']} | {p['model'] or 'not stated'} | "
                       f"{p['dataset']} | {p['patch_area_percent']:g}% ({p['patch_px']} px) | "
                       f"{p['clean_accuracy']:.1f}% | {p['certified_accuracy']:.1f}% | "
                       f"{p['kind']} | [{p['source']}]({p['url']}) {p['note']} |")
        out.append("")
        if note := layout_note(report["published"], run.get("config") or {}):
            out += [note, ""]
    for g in report["groups"]:
        out += _curve_markdown(g)
    for g in report["groups"]:
        out += [f"## Worst classes: {g['method']}, {g['patch_px']} px", "",
                "| class | images | certified |", "|---|---|---|"]
        out += [f"| {c['label']} {c['name']} | {c['certified_accuracy']['n']} | "
                f"{pct(c['certified_accuracy'])} |" for c in g["worst_classes"]]
        out.append("")
    out += _problems_markdown(report)
    if report["diff"] is not None:
        out += diff_markdown(report["diff"])
    return "\n".join(out) + "\n"


def _groups_markdown(groups: list[dict[str, Any]], guarantee: str) -> list[str]:
    """One table per guarantee: the figures mean different things (a recovery method never
    alerts, its clean output is the recovered prediction)."""
    if not groups:
        return []
    detection = guarantee == "detection"
    title = ("### Certified detection (label or ALERT under any patch)" if detection else
             "### Certified recovery (the label under any patch; never alerts)")
    columns = ["method", "patch", "images", "errors", "vanilla", "pruned",
               "clean" if detection else "recovered clean", "certified",
               *(["false alerts"] if detection else []),
               "masks (eval. mean / p50 / p95 of total)", "latency ms (mean / p50 / p95)",
               "images/s"]
    out = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for g in groups:
        m, lat = g["masks"], g["latency_ms"]
        cells = [g["method"], f"{g['patch_px']} px", str(g["images"]), str(g["error_images"]),
                 pct(g["vanilla_accuracy"]), pct(g["pruned_accuracy"]),
                 pct(g["clean_accuracy"]), pct(g["certified_accuracy"]),
                 *([pct(g["false_alert_rate"])] if detection else []),
                 (f"{num(m['evaluated_mean'])} / {num(m['evaluated_p50'])} / "
                  f"{num(m['evaluated_p95'])} of {m['per_image']}"),
                 f"{num(lat['mean'], 2)} / {num(lat['p50'], 2)} / {num(lat['p95'], 2)}",
                 num(g["images_per_s"])]
        out.append("| " + " | ".join(cells) + " |")
    if not detection:
        out += ["", ("masks of a recovery method: one-mask windows per image; evaluated counts "
                     "one- and two-mask inputs run.")]
    return out + [""]


def _curve_markdown(group: dict[str, Any]) -> list[str]:
    """The alert-confidence trade-off of one detection group (see reduce.confidence_curve)."""
    curve = group.get("confidence_curve")
    if not curve:
        return []
    exactness = ("exact (full map)" if curve["exact"] else
                 "work avoidance: alerts over the windows run, so clean accuracy is an upper "
                 "and the false-alert rate a lower bound; rerun with --full-map for exact figures")
    out = [f"## Alert confidence: {group['method']}, {group['patch_px']} px", "",
           f"Detection alerts only on a window that disagrees at softmax confidence >= TAU; "
           f"{exactness}.", ""]
    chosen = curve["at_target"]
    target = f"{100 * curve['false_alert_target']:g}%"
    out += ([f"At TAU = {chosen['tau']:g}, the least with false alerts <= {target}: certified "
             f"{pct(chosen['certified_accuracy'])}, clean {pct(chosen['clean_accuracy'])}, "
             f"false alerts {pct(chosen['false_alert_rate'])}.", ""] if chosen else
            [f"No TAU of the grid has false alerts <= {target}.", ""])
    out += ["| TAU | certified | clean | false alerts |", "|---|---|---|---|"]
    out += [f"| {p['tau']:g} | {pct(p['certified_accuracy'])} | {pct(p['clean_accuracy'])} | "
            f"{pct(p['false_alert_rate'])} |" for p in curve["points"]]
    return out + [""]


def _problems_markdown(report: dict[str, Any]) -> list[str]:
    out = []
    missing = report["completeness"]["missing_shards"]
    if missing:
        out += ["## Missing shards", "", "| shard | images | first | last |", "|---|---|---|---|"]
        out += [f"| {m['index']} | {m['images']} | {m['first']} | {m['last']} |" for m in missing]
        out.append("")
    items = report["errors"]["items"]
    out += [f"## Errors ({len(items)} images)", ""]
    out += [f"- `{e['image_id']}`: {e['error']}" for e in items] or ["none"]
    alerts = report["clean_alerts"]
    out += ["", f"## Alerts on clean images ({alerts['total']} rows)", ""]
    out += [f"- `{a['image_id']}` {a['method']} {a['patch_px']} px: box {a['alert_box']}"
            for a in alerts["items"][:50]] or ["none"]
    return out + [""]


def diff_markdown(diff: dict[str, Any]) -> list[str]:
    out = [f"## Audit diff against {diff['against']} (run {diff['against_run_id']})", "",
           f"Deltas are this run minus the other, {diff['interval']}. Fails when certified "
           f"accuracy drops by more than {diff['max_drop_pp']:g} pp: "
           f"**{'FAILED' if diff['failed'] else 'passed'}**.", "",
           "| method | patch | " + " | ".join(a.replace("_", " ") for a in ACCURACIES)
           + " | lost / gained cert. | verdict |", "|" + "---|" * (len(ACCURACIES) + 4)]
    for g in diff["groups"]:
        out.append(f"| {g['method']} | {g['patch_px']} px | "
                   + " | ".join(signed_pp(g[a]) for a in ACCURACIES)
                   + f" | {len(g['lost_certification'])} / {len(g['gained_certification'])} | "
                   f"{'FAILED' if g['failed'] else 'ok'} |")
    for g in diff["groups"]:
        for what in ("lost_certification", "gained_certification"):
            if g[what]:
                out.append(f"- {g['method']} {g['patch_px']} px {what.replace('_', ' ')}: "
                           + ", ".join(f"`{i}`" for i in g[what]))
    return out + [""]

