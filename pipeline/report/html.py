"""report.html: one self-contained page, tables and inline SVG plots (no scripts, no network):
certified accuracy vs patch size (``svg#plot-certified``), certified vs clean accuracy over
alert confidences (``svg#plot-tradeoff``), masks evaluated per image
(``svg.masks-histogram``), and the clean-alert thumbnails with their alert boxes
(``svg.alert-thumb``, embedded as base64 PNG)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from pipeline.report.reduce import ACCURACIES
from pipeline.report.text import (
    layout_note, model_provenance, num, pct, preprocessing_text, settings_text, signed_pp,
)
from pipeline.report.thumbnails import Thumbnail

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class _Frame:
    """The layout every plot shares: a plot area with a 0-100% y axis, a legend on the right;
    ``x_max`` is the data value at the right edge."""

    x_max: float
    width: int = 720
    height: int = 380
    left: int = 60
    right: int = 230
    top: int = 20
    bottom: int = 50

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def sx(self, value: float) -> float:
        return self.left + self.plot_w * value / self.x_max

    def sy(self, fraction: float) -> float:
        return self.top + self.plot_h * (1 - fraction)

    def opening(self, ident: str, label: str, x_title: str, y_title: str) -> list[str]:
        """The svg element's start, the plot area, the y grid and both axis titles."""
        w, h, left, top = self.width, self.height, self.left, self.top
        parts = [f'<svg id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{w}" '
                 f'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_e(label)}">',
                 f'<rect x="{left}" y="{top}" width="{self.plot_w}" height="{self.plot_h}" '
                 'fill="#fafafa" stroke="#999"/>']
        for tick in range(0, 101, 20):
            y = self.sy(tick / 100)
            parts.append(f'<line x1="{left}" x2="{left + self.plot_w}" y1="{y:.1f}" '
                         f'y2="{y:.1f}" stroke="#ddd"/><text x="{left - 8}" y="{y + 4:.1f}" '
                         f'font-size="11" text-anchor="end">{tick}%</text>')
        middle = top + self.plot_h / 2
        parts.append(f'<text x="{left + self.plot_w / 2}" y="{h - 10}" font-size="12" '
                     f'text-anchor="middle">{_e(x_title)}</text>')
        parts.append(f'<text x="14" y="{middle}" font-size="12" text-anchor="middle" '
                     f'transform="rotate(-90 14 {middle})">{_e(y_title)}</text>')
        return parts


def certified_plot(report: dict[str, Any]) -> str:
    """``svg#plot-certified``: certified accuracy (%) vs patch side (px) per method, with 95%
    interval bars; published results as hollow diamonds labelled "published"."""
    groups, published = report["groups"], report["published"]
    xs = [g["patch_px"] for g in groups] + [p["patch_px"] for p in published]
    frame = _Frame(x_max=max(xs + [1]) * 1.3)
    width, right, top, plot_h = frame.width, frame.right, frame.top, frame.plot_h
    sx, sy = frame.sx, frame.sy
    parts = frame.opening("plot-certified", "certified accuracy versus patch size",
                          "patch side (px)", "certified accuracy")
    for px in sorted(set(xs)):
        parts.append(f'<text x="{sx(px):.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{px}</text>')
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
                     f'measured: {_e(method)}{guarantee_note(groups, method)}</text>')
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
    parts.append(f'<text x="{width - right + 14}" y="{frame.height - 30}" font-size="11" '
                 'fill="#555">bars: 95% Wilson interval</text>')
    return "".join(parts) + "</svg>"


def tradeoff_plot(report: dict[str, Any]) -> str:
    """``svg#plot-tradeoff``: certified against clean accuracy (%) as the alert confidence TAU
    grows, one line per detection group with a curve; published certified-detection results as
    hollow diamonds labelled "published". Empty when no group has a curve."""
    curves = [g for g in report["groups"] if g.get("confidence_curve")]
    if not curves:
        return ""
    published = [p for p in report["published"] if p["kind"] == "certified detection"]
    frame = _Frame(x_max=1.0)
    width, right, top, plot_h = frame.width, frame.right, frame.top, frame.plot_h
    sx, sy = frame.sx, frame.sy
    parts = frame.opening("plot-tradeoff",
                          "certified accuracy versus clean accuracy over alert confidences",
                          "clean accuracy (no alert, right label)", "certified accuracy")
    for tick in range(0, 101, 20):
        parts.append(f'<text x="{sx(tick / 100):.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{tick}%</text>')
    legend_y = top + 10
    for index, group in enumerate(curves):
        colour = PALETTE[index % len(PALETTE)]
        points = [(p["clean_accuracy"]["value"], p["certified_accuracy"]["value"], p["tau"])
                  for p in group["confidence_curve"]["points"]
                  if p["clean_accuracy"]["value"] is not None]
        label = f"{group['method']} {group['patch_px']} px"
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)
        parts.append(f'<polyline class="tradeoff-curve" data-method="{_e(group["method"])}" '
                     f'points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y, tau in points:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}">'
                         f'<title>measured {_e(label)}, TAU {tau:g}: clean {100 * x:.1f}%, '
                         f'certified {100 * y:.1f}%</title></circle>')
        parts.append(f'<circle cx="{width - right + 20}" cy="{legend_y}" r="4.5" fill="{colour}"/>'
                     f'<text x="{width - right + 30}" y="{legend_y + 4}" font-size="12">'
                     f'measured: {_e(label)}</text>')
        legend_y += 18
    for p in published:
        x, y = sx(p["clean_accuracy"] / 100), sy(p["certified_accuracy"] / 100)
        parts.append(
            f'<path class="published-point" d="M{x:.1f},{y - 6:.1f} L{x + 6:.1f},{y:.1f} '
            f'L{x:.1f},{y + 6:.1f} L{x - 6:.1f},{y:.1f} Z" fill="white" stroke="#555" '
            f'stroke-width="1.5"><title>published: {_e(p["defense"])} '
            f'({_e(p["model"] or "model not stated")}), clean {p["clean_accuracy"]:.1f}%, '
            f'certified {p["certified_accuracy"]:.1f}%; {_e(p["title"])}</title></path>'
            f'<text class="published-label" x="{x + 8:.1f}" y="{y - 6:.1f}" font-size="10" '
            'fill="#555">published</text>')
    return "".join(parts) + "</svg>"


def guarantee_note(groups: list[dict[str, Any]], method: str) -> str:
    """The legend suffix ' (recovery)' of a recovery method: its points certify recovery."""
    return " (recovery)" if any(g["method"] == method and g["guarantee"] == "recovery"
                                for g in groups) else ""


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
            f"<p>model <code>{_e(run['model'])}</code>{_e(model_provenance(run))}, data <code>"
            f"{_e(run['dataset']['source'])}</code>, {run['dataset']['images']} images listed, "
            f"{run['image_side']} px"
            + (f" ({_e(text)})" if (text := preprocessing_text(run.get("preprocessing"))) else "")
            + f"; {_e(settings_text(run.get('config') or {}))}; "
            f"shards {comp['shards_present']} of {comp['shards_listed']}; "
            f"{report['errors']['images']} images with errors (counted as not certified).</p>"]
    if not comp["complete"]:
        body.append(f'<p class="warn">{len(comp["missing_shards"])} shards missing: '
                    f'{comp["images_missing"]} images count as not correct and not certified.</p>')
    tradeoff = tradeoff_plot(report)
    body += ["<h2>Measured</h2>", _groups_table(report), _published_table(report["published"]),
             *([f"<p>{_e(note)}</p>"]
               if (note := layout_note(report["published"], run.get("config") or {})) else []),
             "<h2>Certified accuracy vs patch size</h2>", certified_plot(report),
             *(["<h2>Alert confidence: certified vs clean accuracy</h2>", tradeoff,
                "<p>Each point is one alert confidence TAU (hover for it); see report.md for "
                "the table and the TAU whose false alerts stay within 10%.</p>"]
               if tradeoff else []),
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
    """The measured figures, one table per guarantee (``table#measured``: detection,
    ``table#measured-recovery``: recovery, which has no false alerts and whose clean accuracy
    is the recovered prediction's)."""
    tables = []
    for guarantee, ident, caption in (
            ("detection", "measured", "Certified detection: the label or ALERT under any patch"),
            ("recovery", "measured-recovery",
             "Certified recovery: the label under any patch (never alerts)")):
        groups = [g for g in report["groups"] if g["guarantee"] == guarantee]
        if not groups:
            continue
        detection = guarantee == "detection"
        columns = ["method", "patch", "images", "errors", "vanilla", "pruned",
                   "clean" if detection else "recovered clean", "certified",
                   *(["false alerts"] if detection else []),
                   "masks eval. mean / p50 / p95 of total", "latency ms mean / p50 / p95",
                   "images/s*"]
        rows = []
        for g in groups:
            m, lat = g["masks"], g["latency_ms"]
            cells = [g["method"], f"{g['patch_px']} px", g["images"], g["error_images"],
                     *(pct(g[a]) for a in ACCURACIES),
                     *([pct(g["false_alert_rate"])] if detection else []),
                     f"{num(m['evaluated_mean'])} / {num(m['evaluated_p50'])} / "
                     f"{num(m['evaluated_p95'])} of {m['per_image']}",
                     f"{num(lat['mean'], 2)} / {num(lat['p50'], 2)} / {num(lat['p95'], 2)}",
                     num(g["images_per_s"])]
            rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
        tables.append(f"<table id=\"{ident}\"><caption>{_e(caption)}</caption><tr>"
                      + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"
                      + "".join(rows) + "</table>")
    return ("".join(tables) + "<p>Accuracies over all listed images, false alerts over ok rows, "
            "[95% Wilson interval]. *images/s = 1000 / mean latency_ms. A recovery method's "
            "masks are its one-mask windows; evaluated counts one- and two-mask inputs.</p>")


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

