"""The SIN statistics report of ``scalecert analyze`` (the paper's Fig. 1): analysis.json,
analysis.md and analysis.html, from the plain dict of
:func:`pipeline.analyze.driver.run_analysis`. No torch: it renders whatever dict it is given.

The page is self-contained (inline CSS and SVG, no scripts): the benign-against-patched
table, the alpha sweep, ``svg#plot-spread`` (histograms of the per-image distance spread)
and ``svg#plot-alpha`` (attack success and detection against alpha, Fig. 1e). The paper's
claims are qualitative; they are shown beside the measured figures, labelled published, and
no published number is invented for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.io import storage
from pipeline.report.html import _STYLE, PALETTE, _e, _Frame
from pipeline.report.write import write_documents
from scalecert.methods.registry import available_methods, method_info

CITATION = "ScaleCert (Han et al., NeurIPS 2021), Section 3.1 / Fig. 1"
SIDES = ("benign", "patched")
# (rate key of an alpha-sweep entry, its name in tables and plots, dashed in the plot)
SWEEP_RATES = (
    ("attack_success_rate", "attack success on M", False),
    ("alert_rate", "detected (ALERT)", False),
    ("evasion_rate", "evaded (wrong label, no ALERT)", True),
)
SPREAD_BINS = 12


def clean_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None and tuples made
    lists, so that JSON encodes it (``allow_nan=False``) and tables show n/a."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- figures as text -----------------------------------------------------------------------

def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _rate(value: Any) -> str:
    text = _number(value, 1)
    return text if text == "n/a" else f"{100 * value:.1f}%"


def _get(stats: dict[str, Any], *path: str) -> Any:
    """``stats[path[0]][path[1]]...``, None where a key is missing."""
    for key in path:
        if not isinstance(stats, dict):
            return None
        stats = stats.get(key)
    return stats


def _before_after(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "n/a"
    return f"{_rate(entry.get('before'))} → {_rate(entry.get('after'))}"


def _mean_median(stats: dict[str, Any], side: str, figure: str, digits: int) -> str:
    return (f"{_number(_get(stats, side, figure, 'mean'), digits)} / "
            f"{_number(_get(stats, side, figure, 'median'), digits)}")


def side_rows(stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The benign-against-patched table: (figure, benign, patched) as text."""
    return [
        ("distance spread, mean / median (feature-map cells)",
         *(_mean_median(stats, side, "distance_spread", 2) for side in SIDES)),
        ("MeanShift clusters, mean / median",
         *(_mean_median(stats, side, "clusters", 2) for side in SIDES)),
        ("share of the top neurons inside the patch's footprint (benign: the same box), "
         "mean / median", *(_mean_median(stats, side, "in_patch_share", 3) for side in SIDES)),
        ("M's accuracy, densest SIN cluster occluded: before → after",
         *(_before_after(_get(stats, side, "occluded_accuracy", "densest_cluster"))
           for side in SIDES)),
        ("M's accuracy, patch box occluded: before → after", "n/a (no patch)",
         _before_after(_get(stats, "patched", "occluded_accuracy", "patch_box"))),
        (f"fooling rate of the per-image attack on the {stats.get('attack_model', '?')} model",
         "n/a (no patch)", _rate(stats.get("fooling_rate"))),
    ]


def sweep_rows(stats: dict[str, Any]) -> list[list[str]]:
    """The alpha sweep: alpha, images, each rate of :data:`SWEEP_RATES`, mean activation."""
    return [[_number(entry.get("alpha"), 2), str(entry.get("images", "n/a")),
             *(_rate(entry.get(key)) for key, _, _ in SWEEP_RATES),
             _number(entry.get("mean_patch_activation"), 3)]
            for entry in stats.get("alpha_sweep") or []]


SWEEP_COLUMNS = ("alpha", "images (M right)", *(title for _, title, _ in SWEEP_RATES),
                 "mean superficial activation under the patch")


def _lower(a: Any, b: Any) -> str:
    """"yes" when a < b, "no" when not, "n/a" when either is missing."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)):
        return "n/a"
    return "yes" if a < b else "no"


def claim_rows(stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The paper's qualitative claims (published, not measured here), each with the measured
    figure beside it and whether this run's figures point the same way: (claim, measured,
    same direction here)."""
    benign = _get(stats, "benign", "distance_spread", "mean")
    patched = _get(stats, "patched", "distance_spread", "mean")
    box = _get(stats, "patched", "occluded_accuracy", "patch_box") or {}
    densest = _get(stats, "benign", "occluded_accuracy", "densest_cluster") or {}
    sweep = [e for e in stats.get("alpha_sweep") or []
             if isinstance(e.get("attack_success_rate"), (int, float))
             and isinstance(e.get("alert_rate"), (int, float))]
    sweep.sort(key=lambda e: e["alpha"])
    if len(sweep) >= 2:
        first, last = sweep[0], sweep[-1]
        success_drop = first["attack_success_rate"] - last["attack_success_rate"]
        alert_drop = first["alert_rate"] - last["alert_rate"]
        sweep_text = (f"alpha {first['alpha']:g} → {last['alpha']:g}: attack success "
                      f"{_rate(first['attack_success_rate'])} → "
                      f"{_rate(last['attack_success_rate'])}, detected "
                      f"{_rate(first['alert_rate'])} → {_rate(last['alert_rate'])}")
        sweep_same = f"success falls more than detection: {_lower(alert_drop, success_drop)}"
    else:
        sweep_text, sweep_same = "needs two alphas or more with images", "n/a"
    return [
        ("SINs of patched images are localized, of benign images dispersed",
         f"mean distance spread: patched {_number(patched)}, benign {_number(benign)} cells",
         f"patched below benign: {_lower(patched, benign)}"),
        ("occluding localized SINs keeps predictions",
         f"M's accuracy, patched images with the patch box occluded: {_before_after(box)}; "
         f"benign images with their densest SIN cluster occluded: {_before_after(densest)}",
         "patched accuracy rises with the patch box occluded: "
         + _lower(box.get("before"), box.get("after"))),
        ("the adaptive attack loses effect faster than it evades detection", sweep_text,
         sweep_same),
    ]


def _setting_lines(stats: dict[str, Any]) -> list[str]:
    """What was measured, as plain sentences (markdown and html share them)."""
    prov = stats.get("provenance") or {}
    attack = stats.get("attack") or {}
    sha = prov.get("checkpoint_sha256")
    return [
        f"data {prov.get('data', 'n/a')}; model {prov.get('model', 'n/a')} (checkpoint "
        f"{prov.get('checkpoint') or 'none: random weights'}"
        + (f", sha256 {sha}" if sha else "") + ")",
        f"{stats.get('images', 'n/a')} images ({prov.get('images_requested', 'n/a')} asked "
        f"for, spread over the listing); patch {prov.get('patch', 'n/a')} = "
        f"{prov.get('patch_px', attack.get('patch_px', 'n/a'))} px; method "
        f"{prov.get('method', 'n/a')} (M: top-k {prov.get('top_k', 'n/a')}, "
        f"{prov.get('masks_per_axis', 'n/a')} masks per axis)",
        f"superficial layer {stats.get('layer', 'n/a')}; the {stats.get('count', 'n/a')} "
        f"strongest neurons per image; one MeanShift bandwidth for both sides, "
        f"{_number(stats.get('bandwidth'))} cells (estimated on the benign images)",
        f"attack: per-image on the {stats.get('attack_model', 'n/a')} model, "
        f"steps {attack.get('steps', 'n/a')}, restarts {attack.get('restarts', 'n/a')}, "
        f"step {_number(attack.get('step_size'), 4)}, location {attack.get('location', 'n/a')}, "
        f"seed {attack.get('seed', 'n/a')}; the alpha sweep runs the adaptive attack (Eq. 6) "
        "on M, on the images M gets right",
        f"scalecert {prov.get('version', 'n/a')}, {_number(prov.get('seconds'), 1)} s on "
        f"{prov.get('device', 'n/a')}, {prov.get('created', 'n/a')}",
        *([f"{prov['method']} is a recovery method: it never alerts, so its detection rate is "
           "0 by construction"] if _recovery(prov.get("method")) else []),
    ]


def _recovery(method: Any) -> bool:
    return method in available_methods() and method_info(method).guarantee == "recovery"


# --- markdown ------------------------------------------------------------------------------

def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def render_analysis_markdown(stats: dict[str, Any]) -> str:
    """analysis.md: the settings, the benign-against-patched table, the alpha sweep, and the
    paper's claims labelled published (qualitative) beside the measured figures."""
    stats = clean_json(stats)
    out = ["# ScaleCert SIN statistics (Fig. 1)", ""]
    out += [f"- {line}" for line in _setting_lines(stats)]
    out += ["", "## Measured: benign against patched", "",
            _md_row(("figure", "benign", "patched")), "|---|---|---|"]
    out += [_md_row(row) for row in side_rows(stats)]
    out += ["", "Distance spread (Eq. 4-5): the standard deviation of the top neurons' "
            "distances to their centroid, small when they are localized.", "",
            "## Adaptive attack against alpha (Fig. 1e)", "",
            _md_row(SWEEP_COLUMNS), "|" + "---|" * len(SWEEP_COLUMNS)]
    out += [_md_row(row) for row in sweep_rows(stats)]
    out += ["", f"## Published (qualitative, not measured here): {CITATION}", "",
            "The paper states these without numbers; the measured column is this run's.", "",
            _md_row(("published (qualitative)", "measured here", "same direction here")),
            "|---|---|---|"]
    out += [_md_row((f"published: {claim}", measured, same))
            for claim, measured, same in claim_rows(stats)]
    return "\n".join(out) + "\n"


# --- html ----------------------------------------------------------------------------------

def _finite_values(values: Any) -> list[float]:
    return [float(v) for v in values or []
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def spread_plot(stats: dict[str, Any]) -> str:
    """``svg#plot-spread``: histograms of the per-image distance spread, benign against
    patched (share of each side's images per bin), each side's mean a dashed line."""
    values = {side: _finite_values(_get(stats, side, "distance_spread", "values"))
              for side in SIDES}
    every = values["benign"] + values["patched"]
    lo = math.floor(min(every)) if every else 0.0
    hi = max(math.ceil(max(every)), lo + 1) if every else 1.0
    frame = _Frame(x_max=hi - lo)
    top, plot_h, width, right = frame.top, frame.plot_h, frame.width, frame.right
    parts = frame.opening("plot-spread", "per-image distance spread, benign against patched",
                          "distance spread (feature-map cells)", "share of images")
    bins = SPREAD_BINS
    step = (hi - lo) / bins
    for k in range(bins + 1):
        if k % 2 == 0:
            parts.append(f'<text x="{frame.sx(k * step):.1f}" y="{top + plot_h + 16}" '
                         f'font-size="11" text-anchor="middle">{lo + k * step:.1f}</text>')
    for s, side in enumerate(SIDES):
        colour = PALETTE[s]
        data = values[side]
        counts = [0] * bins
        for v in data:
            counts[min(int((v - lo) / step), bins - 1)] += 1
        for k, count in enumerate(counts):
            if not count:
                continue
            share = count / len(data)
            x0 = frame.sx(k * step + s * step / 2)
            y = frame.sy(share)
            parts.append(f'<rect class="bar" data-side="{side}" x="{x0:.1f}" y="{y:.1f}" '
                         f'width="{max(frame.sx(step / 2) - frame.sx(0) - 1, 1):.1f}" '
                         f'height="{frame.sy(0) - y:.1f}" fill="{colour}" fill-opacity="0.8">'
                         f'<title>{side}: {count} of {len(data)} images with spread '
                         f'{lo + k * step:.2f} to {lo + (k + 1) * step:.2f}</title></rect>')
        if data:
            mean = sum(data) / len(data)
            x = frame.sx(mean - lo)
            parts.append(f'<line class="mean-line" data-side="{side}" x1="{x:.1f}" x2="{x:.1f}" '
                         f'y1="{top}" y2="{frame.sy(0):.1f}" stroke="{colour}" '
                         f'stroke-dasharray="5,3" stroke-width="1.5"><title>{side} mean '
                         f'{mean:.2f}</title></line>')
        legend_y = top + 10 + 18 * s
        parts.append(f'<rect x="{width - right + 14}" y="{legend_y - 6}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{width - right + 30}" y="{legend_y + 4}" '
                     f'font-size="12">{side} ({len(data)} images)</text>')
    parts.append(f'<text x="{width - right + 14}" y="{top + 56}" font-size="11" fill="#555">'
                 'dashed: the mean</text>')
    if not every:
        parts.append(f'<text x="{frame.left + 10}" y="{top + 20}">no values</text>')
    return "".join(parts) + "</svg>"


def alpha_plot(stats: dict[str, Any]) -> str:
    """``svg#plot-alpha``: attack success on M, detection (ALERT) and evasion rates against
    the adaptive attack's alpha (Fig. 1e); entries without images have no points."""
    sweep = sorted((e for e in stats.get("alpha_sweep") or []
                    if isinstance(e.get("alpha"), (int, float))), key=lambda e: e["alpha"])
    alphas = [float(e["alpha"]) for e in sweep]
    frame = _Frame(x_max=(max(alphas) if alphas and max(alphas) > 0 else 1.0) * 1.05)
    top, plot_h, width, right = frame.top, frame.plot_h, frame.width, frame.right
    parts = frame.opening("plot-alpha", "adaptive attack success and detection against alpha",
                          "alpha (weight of the activation penalty, Eq. 6)", "share of images")
    for alpha in alphas:
        parts.append(f'<text x="{frame.sx(alpha):.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{alpha:g}</text>')
    for index, (key, title, dashed) in enumerate(SWEEP_RATES):
        colour = PALETTE[index % len(PALETTE)]
        points = [(float(e["alpha"]), float(e[key])) for e in sweep
                  if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        if len(points) > 1:
            path = " ".join(f"{frame.sx(a):.1f},{frame.sy(r):.1f}" for a, r in points)
            parts.append(f'<polyline class="rate-line" data-rate="{key}" points="{path}" '
                         f'fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
        for alpha, rate in points:
            parts.append(f'<circle data-rate="{key}" cx="{frame.sx(alpha):.1f}" '
                         f'cy="{frame.sy(rate):.1f}" r="3.5" fill="{colour}"><title>{_e(title)}'
                         f' at alpha {alpha:g}: {100 * rate:.1f}%</title></circle>')
        legend_y = top + 10 + 18 * index
        parts.append(f'<line x1="{width - right + 12}" x2="{width - right + 26}" '
                     f'y1="{legend_y}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>'
                     f'<text x="{width - right + 30}" y="{legend_y + 4}" font-size="12">'
                     f'{_e(title)}</text>')
    if not sweep:
        parts.append(f'<text x="{frame.left + 10}" y="{top + 20}">no alpha sweep</text>')
    return "".join(parts) + "</svg>"


def _html_table(ident: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                row_class: str = "") -> str:
    cls = f' class="{row_class}"' if row_class else ""
    return (f'<table id="{ident}"><tr>' + "".join(f"<th>{_e(c)}</th>" for c in columns)
            + "</tr>" + "".join(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row)
                               + "</tr>" for row in rows) + "</table>")


def render_analysis_html(stats: dict[str, Any]) -> str:
    """analysis.html: one self-contained page (inline CSS and SVG, no scripts, no network)
    with the tables of :func:`render_analysis_markdown` and the two plots."""
    stats = clean_json(stats)
    body = ["<h1>ScaleCert SIN statistics (Fig. 1)</h1>",
            "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in _setting_lines(stats)) + "</ul>",
            "<h2>Measured: benign against patched</h2>",
            _html_table("analysis-sides", ("figure", "benign", "patched"), side_rows(stats)),
            "<p>Distance spread (Eq. 4-5): the standard deviation of the top neurons' distances "
            "to their centroid, small when they are localized.</p>",
            spread_plot(stats),
            "<h2>Adaptive attack against alpha (Fig. 1e)</h2>",
            _html_table("analysis-alpha", SWEEP_COLUMNS, sweep_rows(stats)),
            alpha_plot(stats),
            f"<h2>Published (qualitative, not measured here)</h2><p>{_e(CITATION)}. The paper "
            "states these without numbers; the measured column is this run's.</p>",
            _html_table("analysis-published", ("", "published (qualitative)", "measured here",
                                               "same direction here"),
                        [("published", *row) for row in claim_rows(stats)], "published")]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ScaleCert SIN statistics</title><style>{_STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


# --- the terminal and the files ------------------------------------------------------------

def summary_lines(stats: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: spread and clusters per side, fooling rate, the sweep."""
    stats = clean_json(stats)
    out = [f"SIN statistics of {stats.get('images', 'n/a')} images, layer "
           f"{stats.get('layer', 'n/a')}, top {stats.get('count', 'n/a')} neurons",
           "  mean distance spread: " + ", ".join(
               f"{side} {_number(_get(stats, side, 'distance_spread', 'mean'))}" for side in SIDES),
           "  mean MeanShift clusters: " + ", ".join(
               f"{side} {_number(_get(stats, side, 'clusters', 'mean'))}" for side in SIDES),
           f"  per-image attack on the {stats.get('attack_model', 'n/a')} model fools "
           f"{_rate(stats.get('fooling_rate'))}"]
    for entry in stats.get("alpha_sweep") or []:
        out.append(f"  alpha {_number(entry.get('alpha'))}: " + ", ".join(
            f"{title} {_rate(entry.get(key))}" for key, title, _ in SWEEP_RATES)
            + f" ({entry.get('images', 'n/a')} images M gets right)")
    return out


def write_analysis(out: str, stats: dict[str, Any],
                   s3: storage.S3Options | None = None) -> list[str]:
    """Write analysis.json (sorted keys, NaN as null), analysis.md and analysis.html into
    ``out`` (local or s3://); their locations."""
    cleaned = clean_json(stats)
    return list(write_documents(out, "analysis", cleaned, render_analysis_markdown(cleaned),
                                render_analysis_html(cleaned), s3))
