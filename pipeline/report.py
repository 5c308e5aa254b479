"""``scalecert report``: a run's figures as report.json, report.md and report.html.

The figures come from :mod:`pipeline.reduce` (definitions there); published numbers from
:mod:`pipeline.published`, always in their own rows labelled "published". The HTML is one
self-contained file: tables, and plots drawn here as inline SVG (no scripts, no network):
certified accuracy vs patch size (``svg#plot-certified``), masks evaluated per image
(``svg.masks-histogram``), and the images that alert on their clean input with their alert
boxes (``svg.alert-thumb``, thumbnails embedded as base64 PNG).

report.json (``schema = "scalecert-report/1"``; keys are stable, new ones may be added):

- ``schema``, ``generated`` (UTC ISO time)
- ``run``: location, run_id, fingerprint, model, checkpoint_sha256, version, created,
  image_side, config (the manifest's), dataset {source, name, layout, classes, images}
- ``completeness``: complete, shards_listed, shards_present, missing_shards [{index, images,
  first, last}], images_listed, images_with_rows, images_missing
- ``errors``: images (count), items [{image_id, label, error}]
- ``definitions``: metric name -> what it counts, over what
- ``groups``: one per (method, patch_px): method, patch_px, patch_area_percent, images,
  ok_images, error_images, missing_images; vanilla_accuracy, pruned_accuracy, clean_accuracy,
  certified_accuracy, false_alert_rate as {value, successes, n, ci95: [lo, hi]} (fractions);
  masks {per_image, evaluated_mean, evaluated_p50, evaluated_p95, histogram [[n_evaluated,
  images]]}; latency_ms {mean, p50, p95}; images_per_s; worst_classes [{label, name,
  certified_accuracy}]
- ``published``: rows comparable with the run (same image side and class count): source,
  title, url, where, defense, model, dataset, image_side, patch_area_percent, patch_px,
  clean_accuracy, certified_accuracy (percent, as published), kind, note, published (true)
- ``clean_alerts``: total, items (up to 1000) [{image_id, method, patch_px, label,
  prediction, alert_box [top, left, bottom, right] or null}]
- ``diff``: null, or the audit diff against ``--against`` (see :func:`pipeline.reduce.diff_runs`):
  against, against_run_id, against_fingerprint, max_drop_pp, interval, failed,
  groups [{method, patch_px, <each accuracy>: {new, old, delta, ci95, lost, gained},
  certified_drop_pp, failed, lost_certification, gained_certification}],
  groups_only_in_run, groups_only_in_against
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pipeline import storage
from pipeline.published import PublishedRow, relevant
from pipeline.reduce import (
    ACCURACIES, RunData, clean_alerts, diff_runs, error_items, summarise_group,
)

SCHEMA_VERSION = "scalecert-report/1"
MAX_ALERT_ITEMS = 1000
DEFINITIONS = MappingProxyType({
    "vanilla_accuracy": "vanilla_prediction == label (unpruned model), over all listed images",
    "pruned_accuracy": "prediction == label (SIN-pruned model M(x)), over all listed images",
    "clean_accuracy": "clean_output == label (detection on the clean image returns the label), "
                      "over all listed images",
    "certified_accuracy": "certified, over all listed images",
    "false_alert_rate": "clean_output == -1 (ALERT on the clean image), over rows with status ok",
    "errors_and_missing": "error rows and images of missing shards count as not correct and not "
                          "certified in every accuracy",
    "ci95": "95% Wilson score interval",
    "images_per_s": "1000 / mean latency_ms (per-image share of a worker's batch time), not the "
                    "run's wall-clock throughput",
    "diff_ci95": "new - old, Newcombe method 10 interval for paired proportions (same images)",
})
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def dataset_name(source: str) -> str:
    """The last path component of a dataset source, safe as one S3 key segment."""
    last = source.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "dataset"


def build_report(run: RunData, published: tuple[PublishedRow, ...], against: RunData | None = None,
                 max_drop_pp: float = 1.0, worst: int = 10) -> dict[str, Any]:
    """The report document (see the module docstring for its keys)."""
    manifest = run.manifest
    dataset = manifest["dataset"]
    alerts = clean_alerts(run)
    errors = error_items(run)
    side = int(manifest.get("image_side") or 0)
    return {
        "schema": SCHEMA_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {
            "location": run.location, "run_id": manifest["run_id"],
            "fingerprint": manifest["fingerprint"], "model": manifest["config"].get("model"),
            "checkpoint_sha256": manifest.get("checkpoint_sha256"),
            "version": manifest.get("version"), "created": manifest.get("created"),
            "image_side": side, "config": manifest["config"],
            "dataset": {"source": dataset.get("source"), "name": dataset_name(dataset.get("source", "")),
                        "layout": dataset.get("layout"), "classes": dataset.get("classes"),
                        "images": run.images},
        },
        "completeness": {
            "complete": not run.missing, "shards_listed": len(manifest["shards"]),
            "shards_present": len(manifest["shards"]) - len(run.missing),
            "missing_shards": [vars(m) for m in run.missing], "images_listed": run.images,
            "images_with_rows": int(run.rows["image_id"].nunique()),
            "images_missing": sum(m.images for m in run.missing),
        },
        "errors": {"images": len(errors), "items": errors},
        "definitions": dict(DEFINITIONS),
        "groups": [summarise_group(run, method, px, worst) for method, px in run.groups],
        "published": [row.to_dict() for row in relevant(published, side, int(dataset.get("classes") or 0))],
        "clean_alerts": {"total": len(alerts), "items": alerts[:MAX_ALERT_ITEMS]},
        "diff": None if against is None else diff_runs(run, against, max_drop_pp),
    }


# --- text -----------------------------------------------------------------------------------

def pct(p: dict[str, Any] | None) -> str:
    """``83.1% [80.2, 85.7]`` for a proportion dict; ``n/a`` when it has no images."""
    if not p or p["n"] == 0:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def signed_pp(delta: dict[str, Any]) -> str:
    lo, hi = delta["ci95"]
    return f"{100 * delta['delta']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the same content as report.json, as tables."""
    run, comp = report["run"], report["completeness"]
    out = [f"# ScaleCert report: run {run['run_id']}", "",
           f"- model `{run['model']}`, checkpoint sha256 `{str(run['checkpoint_sha256'])[:16]}`",
           f"- data `{run['dataset']['source']}` ({run['dataset']['images']} images listed, "
           f"{run['image_side']} px)",
           f"- shards: {comp['shards_present']} of {comp['shards_listed']} present"
           + ("" if comp["complete"] else f"; **{len(comp['missing_shards'])} MISSING "
              f"({comp['images_missing']} images counted as not certified)**"),
           f"- errors: {report['errors']['images']} images with status error (counted as not "
           "correct, not certified)", "",
           "## Measured", "",
           "Accuracies over all listed images with 95% Wilson intervals; false alerts over ok rows.",
           "", "| method | patch | images | errors | vanilla | pruned | clean | certified | "
           "false alerts | masks (eval. mean / p50 / p95 of total) | latency ms (mean / p50 / "
           "p95) | images/s |", "|" + "---|" * 12]
    for g in report["groups"]:
        m, lat = g["masks"], g["latency_ms"]
        out.append(
            f"| {g['method']} | {g['patch_px']} px | {g['images']} | {g['error_images']} | "
            f"{pct(g['vanilla_accuracy'])} | {pct(g['pruned_accuracy'])} | "
            f"{pct(g['clean_accuracy'])} | {pct(g['certified_accuracy'])} | "
            f"{pct(g['false_alert_rate'])} | {_num(m['evaluated_mean'])} / "
            f"{_num(m['evaluated_p50'])} / {_num(m['evaluated_p95'])} of {m['per_image']} | "
            f"{_num(lat['mean'], 2)} / {_num(lat['p50'], 2)} / {_num(lat['p95'], 2)} | "
            f"{_num(g['images_per_s'])} |")
    out += ["", "images/s = 1000 / mean latency_ms (per-worker, from the rows).", ""]
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


# --- thumbnails -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Thumbnail:
    image_id: str
    method: str
    patch_px: int
    label: int
    prediction: int
    box: list[int] | None
    png_base64: str | None  # None: the image could not be read (see ``problem``)
    problem: str | None


def alert_thumbnails(report: dict[str, Any], s3: storage.S3Options | None,
                     limit: int = 24) -> list[Thumbnail]:
    """Thumbnails of the first ``limit`` clean alerts, read from the dataset and preprocessed
    as the run did; an image that cannot be read gets ``problem`` instead of pixels."""
    from PIL import Image

    from pipeline.images import Preprocess, decode

    source = report["run"]["dataset"]["source"]
    side = report["run"]["image_side"]
    thumbs = []
    for item in report["clean_alerts"]["items"][:limit]:
        png, problem = None, None
        try:
            pixels = decode(storage.read_bytes(storage.join(source, item["image_id"]), s3),
                            Preprocess.for_input_size(side))
            image = Image.fromarray(pixels)
            if side > 112:
                image = image.resize((112, 112), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            png = base64.b64encode(buffer.getvalue()).decode("ascii")
        except Exception as exc:  # any failure becomes a note in the page, never a failed report
            problem = f"cannot read {item['image_id']} from {source}: {exc}"
        thumbs.append(Thumbnail(item["image_id"], item["method"], item["patch_px"], item["label"],
                                item["prediction"], item["alert_box"], png, problem))
    return thumbs


# --- HTML and SVG ---------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def certified_plot(report: dict[str, Any]) -> str:
    """``svg#plot-certified``: certified accuracy (%) vs patch side (px) per method, with 95%
    interval bars; published results as hollow diamonds labelled "published"."""
    width, height, left, right, top, bottom = 720, 380, 60, 230, 20, 50
    groups, published = report["groups"], report["published"]
    xs = [g["patch_px"] for g in groups] + [p["patch_px"] for p in published]
    x_max = max(xs + [1]) * 1.3
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(px: float) -> float:
        return left + plot_w * px / x_max

    def sy(fraction: float) -> float:
        return top + plot_h * (1 - fraction)

    parts = [f'<svg id="plot-certified" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="certified accuracy versus patch size">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
             'stroke="#999"/>']
    for tick in range(0, 101, 20):
        y = sy(tick / 100)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 8}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{tick}%</text>')
    for px in sorted(set(xs)):
        parts.append(f'<text x="{sx(px):.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{px}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" font-size="12" '
                 'text-anchor="middle">patch side (px)</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">certified accuracy</text>')
    methods = list(dict.fromkeys(g["method"] for g in groups))
    legend_y = top + 10
    for index, method in enumerate(methods):
        colour = PALETTE[index % len(PALETTE)]
        points = sorted((g["patch_px"], g["certified_accuracy"]) for g in groups
                        if g["method"] == method and g["certified_accuracy"]["n"])
        if len(points) > 1:
            path = " ".join(f"{sx(px):.1f},{sy(p['value']):.1f}" for px, p in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         'stroke-width="1.5"/>')
        for px, p in points:
            x = sx(px)
            lo, hi = p["ci95"]
            parts.append(
                f'<g class="measured-point" data-method="{_e(method)}" data-patch-px="{px}">'
                f'<line class="ci-bar" x1="{x:.1f}" x2="{x:.1f}" y1="{sy(lo):.1f}" '
                f'y2="{sy(hi):.1f}" stroke="{colour}" stroke-width="2"/>'
                f'<line x1="{x - 5:.1f}" x2="{x + 5:.1f}" y1="{sy(lo):.1f}" y2="{sy(lo):.1f}" '
                f'stroke="{colour}"/><line x1="{x - 5:.1f}" x2="{x + 5:.1f}" y1="{sy(hi):.1f}" '
                f'y2="{sy(hi):.1f}" stroke="{colour}"/>'
                f'<circle cx="{x:.1f}" cy="{sy(p["value"]):.1f}" r="4.5" fill="{colour}">'
                f'<title>measured {_e(method)} {px} px: {pct(p)}</title></circle></g>')
        parts.append(f'<circle cx="{width - right + 20}" cy="{legend_y}" r="4.5" fill="{colour}"/>'
                     f'<text x="{width - right + 30}" y="{legend_y + 4}" font-size="12">'
                     f'measured: {_e(method)}</text>')
        legend_y += 18
    for p in published:
        x, y = sx(p["patch_px"]), sy(p["certified_accuracy"] / 100)
        parts.append(
            f'<path class="published-point" d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y:.1f} '
            f'L{x:.1f},{y + 6:.1f} L{x - 6:.1f},{y:.1f} Z" fill="white" stroke="#555" '
            f'stroke-width="1.5"><title>published: {_e(p["defense"])} '
            f'({_e(p["model"] or "model not stated")}), {p["certified_accuracy"]:.1f}% '
            f'certified, {_e(p["kind"])}; {_e(p["title"])}</title></path>')
    for px in sorted({p["patch_px"] for p in published}):
        top_y = min(sy(p["certified_accuracy"] / 100) for p in published if p["patch_px"] == px)
        parts.append(f'<text class="published-label" x="{sx(px) + 9:.1f}" y="{top_y - 6:.1f}" '
                     'font-size="10" fill="#555">published</text>')
    if published:
        ly = legend_y + 4
        parts.append(f'<path d="M{width - right + 20},{ly - 6} L{width - right + 26},{ly} '
                     f'L{width - right + 20},{ly + 6} L{width - right + 14},{ly} Z" fill="white" '
                     f'stroke="#555" stroke-width="1.5"/><text x="{width - right + 30}" '
                     f'y="{ly + 4}" font-size="12">published (not measured;</text>'
                     f'<text x="{width - right + 30}" y="{ly + 20}" font-size="12">hover for '
                     'source)</text>')
    parts.append(f'<text x="{width - right + 14}" y="{height - 30}" font-size="11" '
                 'fill="#555">bars: 95% Wilson interval</text>')
    return "".join(parts) + "</svg>"


def masks_histogram(group: dict[str, Any]) -> str:
    """``svg.masks-histogram``: images per number of masks evaluated, for one group."""
    width, height, left, bottom, top = 360, 180, 40, 36, 14
    bins = group["masks"]["histogram"]
    ident = f"plot-masks-{group['method']}-{group['patch_px']}"
    parts = [f'<svg id="{_e(ident)}" class="masks-histogram" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    if not bins:
        return "".join(parts) + '<text x="10" y="20">no ok rows</text></svg>'
    total_masks = max(group["masks"]["per_image"] or 0, max(v for v, _ in bins))
    top_count = max(c for _, c in bins)
    plot_w, plot_h = width - left - 10, height - top - bottom
    bar_w = plot_w / (total_masks + 1)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" stroke="#999"/>')
    for value, count in bins:
        h = plot_h * count / top_count
        parts.append(f'<rect class="bar" x="{left + value * bar_w:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#1f77b4">'
                     f'<title>{count} images evaluated {value} masks</title></rect>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">'
                 f'{top_count}</text><text x="{left}" y="{height - 20}" font-size="10">0</text>'
                 f'<text x="{left + plot_w}" y="{height - 20}" font-size="10" text-anchor="end">'
                 f'{total_masks}</text><text x="{left + plot_w / 2}" y="{height - 6}" '
                 'font-size="11" text-anchor="middle">masks evaluated per image</text>')
    return "".join(parts) + "</svg>"


def thumbnail_svg(thumb: Thumbnail, side: int) -> str:
    """``svg.alert-thumb``: the image with its alert box (rows, columns in model pixels)."""
    parts = [f'<svg class="alert-thumb" xmlns="http://www.w3.org/2000/svg" width="128" '
             f'height="128" viewBox="0 0 {side} {side}" data-image-id="{_e(thumb.image_id)}">'
             f'<image width="{side}" height="{side}" style="image-rendering:pixelated" '
             f'href="data:image/png;base64,{thumb.png_base64}"/>']
    if thumb.box is not None:
        top, left, bottom, right = thumb.box
        parts.append(f'<rect class="alert-box" x="{left}" y="{top}" width="{right - left}" '
                     f'height="{bottom - top}" fill="none" stroke="#ff1744" '
                     f'stroke-width="{max(side / 32, 1.0):.2f}"/>')
    return "".join(parts) + "</svg>"


_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1150px}
table{border-collapse:collapse;margin:8px 0 18px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#eee}
tr.published td{background:#f6f3e8;font-style:italic}.warn{color:#b00020;font-weight:bold}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;font-size:11px;width:132px}
.hists{display:flex;flex-wrap:wrap;gap:12px}code{font-size:12px}"""


def render_html(report: dict[str, Any], thumbs: list[Thumbnail]) -> str:
    """report.html: one self-contained page (inline CSS and SVG, no scripts, no network)."""
    run, comp = report["run"], report["completeness"]
    body = [f"<h1>ScaleCert report: run {_e(run['run_id'])}</h1>",
            f"<p>model <code>{_e(run['model'])}</code>, data <code>{_e(run['dataset']['source'])}"
            f"</code>, {run['dataset']['images']} images listed, {run['image_side']} px; "
            f"shards {comp['shards_present']} of {comp['shards_listed']}; "
            f"{report['errors']['images']} images with errors (counted as not certified).</p>"]
    if not comp["complete"]:
        body.append(f'<p class="warn">{len(comp["missing_shards"])} shards missing: '
                    f'{comp["images_missing"]} images count as not correct and not certified.</p>')
    body += ["<h2>Measured</h2>", _groups_table(report), _published_table(report["published"]),
             "<h2>Certified accuracy vs patch size</h2>", certified_plot(report),
             "<h2>Masks evaluated per image</h2>", '<div class="hists">']
    for g in report["groups"]:
        body.append(f"<figure><figcaption>{_e(g['method'])}, {g['patch_px']} px</figcaption>"
                    f"{masks_histogram(g)}</figure>")
    body.append("</div>")
    body += _alerts_html(report, thumbs)
    body += _classes_html(report) + _problems_html(report)
    if report["diff"] is not None:
        body += _diff_html(report["diff"])
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ScaleCert report {_e(run['run_id'])}</title><style>{_STYLE}</style></head>"
            "<body>" + "\n".join(body) + "</body></html>\n")


def _groups_table(report: dict[str, Any]) -> str:
    head = ("<table id=\"measured\"><tr><th>method</th><th>patch</th><th>images</th><th>errors"
            "</th><th>vanilla</th><th>pruned</th><th>clean</th><th>certified</th><th>false "
            "alerts</th><th>masks eval. mean / p50 / p95 of total</th><th>latency ms mean / "
            "p50 / p95</th><th>images/s*</th></tr>")
    rows = []
    for g in report["groups"]:
        m, lat = g["masks"], g["latency_ms"]
        cells = [g["method"], f"{g['patch_px']} px", g["images"], g["error_images"],
                 *(pct(g[a]) for a in (*ACCURACIES, "false_alert_rate")),
                 f"{_num(m['evaluated_mean'])} / {_num(m['evaluated_p50'])} / "
                 f"{_num(m['evaluated_p95'])} of {m['per_image']}",
                 f"{_num(lat['mean'], 2)} / {_num(lat['p50'], 2)} / {_num(lat['p95'], 2)}",
                 _num(g["images_per_s"])]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return (head + "".join(rows) + "</table><p>Accuracies over all listed images, false alerts "
            "over ok rows, [95% Wilson interval]. *images/s = 1000 / mean latency_ms.</p>")


def _published_table(published: list[dict[str, Any]]) -> str:
    if not published:
        return "<p>No published results for this image size and class count.</p>"
    rows = "".join(
        f"<tr class=\"published\"><td>published</td><td>{_e(p['defense'])}</td>"
        f"<td>{_e(p['model'] or 'not stated')}</td><td>{_e(p['dataset'])}</td>"
        f"<td>{p['patch_area_percent']:g}% ({p['patch_px']} px)</td><td>{p['clean_accuracy']:.1f}%"
        f"</td><td>{p['certified_accuracy']:.1f}%</td><td>{_e(p['kind'])}</td>"
        f"<td><a href=\"{_e(p['url'])}\">{_e(p['title'])}</a> ({_e(p['where'])}) {_e(p['note'])}"
        "</td></tr>" for p in published)
    return ("<h3>Published results (not measured here)</h3><table id=\"published\"><tr><th></th>"
            "<th>defense</th><th>model</th><th>dataset</th><th>patch</th><th>clean</th>"
            "<th>certified</th><th>kind</th><th>source</th></tr>" + rows + "</table>")


def _alerts_html(report: dict[str, Any], thumbs: list[Thumbnail]) -> list[str]:
    total = report["clean_alerts"]["total"]
    out = [f"<h2>Alerts on clean images ({total})</h2>"]
    if not total:
        return out + ["<p>No image alerts on its clean input.</p>"]
    out.append(f"<p>First {len(thumbs)} shown; red: the located block (no box: majority rule).</p>"
               '<div class="gallery" id="alert-gallery">')
    problems = []
    for t in thumbs:
        if t.png_base64 is None:
            problems.append(t.problem)
            continue
        out.append(f"<figure>{thumbnail_svg(t, report['run']['image_side'])}<figcaption>"
                   f"{_e(t.image_id)}<br>{_e(t.method)} {t.patch_px} px, label {t.label}, "
                   f"M(x) {t.prediction}</figcaption></figure>")
    out.append("</div>")
    if problems:
        out.append(f'<p class="warn" id="thumbnail-problems">{len(problems)} images could not be '
                   "shown:</p><ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>")
    return out


def _classes_html(report: dict[str, Any]) -> list[str]:
    out = ["<h2>Worst classes (lowest certified accuracy)</h2>"]
    for g in report["groups"]:
        rows = "".join(f"<tr><td>{c['label']}</td><td>{_e(c['name'])}</td>"
                       f"<td>{c['certified_accuracy']['n']}</td>"
                       f"<td>{pct(c['certified_accuracy'])}</td></tr>" for c in g["worst_classes"])
        out.append(f"<h3>{_e(g['method'])}, {g['patch_px']} px</h3><table class=\"classes\"><tr>"
                   f"<th>label</th><th>class</th><th>images</th><th>certified</th></tr>{rows}</table>")
    return out


def _problems_html(report: dict[str, Any]) -> list[str]:
    out = []
    missing = report["completeness"]["missing_shards"]
    if missing:
        out.append('<h2 class="warn">Missing shards</h2><table id="missing"><tr><th>shard</th>'
                   "<th>images</th><th>first</th><th>last</th></tr>" + "".join(
                       f"<tr><td>{m['index']}</td><td>{m['images']}</td><td>{_e(m['first'])}</td>"
                       f"<td>{_e(m['last'])}</td></tr>" for m in missing) + "</table>")
    items = report["errors"]["items"]
    out.append(f"<h2>Errors ({len(items)} images)</h2>")
    if items:
        out.append('<table id="errors"><tr><th>image</th><th>label</th><th>reason</th></tr>'
                   + "".join(f"<tr><td>{_e(e['image_id'])}</td><td>{e['label']}</td>"
                             f"<td>{_e(e['error'])}</td></tr>" for e in items) + "</table>")
    return out


def _diff_html(diff: dict[str, Any]) -> list[str]:
    verdict = "FAILED" if diff["failed"] else "passed"
    out = [f"<h2>Audit diff against {_e(diff['against'])}</h2>",
           f"<p class=\"{'warn' if diff['failed'] else ''}\">{verdict}: fails when certified "
           f"accuracy drops by more than {diff['max_drop_pp']:g} pp. Deltas: this run minus "
           f"the other, {_e(diff['interval'])}.</p><table id=\"diff\"><tr><th>method</th>"
           "<th>patch</th>" + "".join(f"<th>{a.replace('_', ' ')}</th>" for a in ACCURACIES)
           + "<th>lost / gained cert.</th><th>verdict</th></tr>"]
    for g in diff["groups"]:
        out.append(f"<tr><td>{_e(g['method'])}</td><td>{g['patch_px']} px</td>"
                   + "".join(f"<td>{signed_pp(g[a])}</td>" for a in ACCURACIES)
                   + f"<td>{len(g['lost_certification'])} / {len(g['gained_certification'])}</td>"
                   f"<td>{'FAILED' if g['failed'] else 'ok'}</td></tr>")
    out.append("</table>")
    for g in diff["groups"]:
        for what in ("lost_certification", "gained_certification"):
            if g[what]:
                out.append(f"<p>{_e(g['method'])} {g['patch_px']} px {what.replace('_', ' ')}: "
                           + ", ".join(f"<code>{_e(i)}</code>" for i in g[what]) + "</p>")
    return out


# --- writing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class WrittenReport:
    report: dict[str, Any]
    locations: tuple[str, ...]  # report.json, report.md, report.html


def write_report(report: dict[str, Any], out_dir: str, s3: storage.S3Options | None,
                 thumbnails: int = 24) -> WrittenReport:
    """Write report.json, report.md and report.html into ``out_dir`` (local or s3://)."""
    thumbs = alert_thumbnails(report, s3, thumbnails) if thumbnails > 0 else []
    files = {
        "report.json": json.dumps(report, indent=2, sort_keys=True, allow_nan=False,
                                  default=_json_default) + "\n",
        "report.md": render_markdown(report),
        "report.html": render_html(report, thumbs),
    }
    locations = []
    for name, text in files.items():
        at = storage.join(out_dir, name)
        storage.write_text_atomic(at, text, s3)
        locations.append(at)
    return WrittenReport(report, tuple(locations))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"report.json: cannot encode {type(value).__name__}")
