"""Figures as text, shared by the terminal, report.md and report.html."""

from __future__ import annotations

from typing import Any


def pct(p: dict[str, Any] | None) -> str:
    """``83.1% [80.2, 85.7]`` for a proportion dict; ``n/a`` when it has no images."""
    if not p or p["n"] == 0:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def signed_pp(delta: dict[str, Any]) -> str:
    lo, hi = delta["ci95"]
    return f"{100 * delta['delta']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"



def model_provenance(record: dict[str, Any]) -> str:
    """What a manifest (or a report's ``run``) says of a user model beyond its spec and
    checkpoint: ``, file sha256 1a2b3c4d5e6f7a8b, packages timm 1.0.3``; empty for a
    built-in."""
    text = ""
    if record.get("source_sha256"):
        text += f", file sha256 {str(record['source_sha256'])[:16]}"
    versions = record.get("package_versions") or {}
    if versions:
        text += ", packages " + ", ".join(f"{name} {version or '(not installed: file hashed)'}"
                                          for name, version in sorted(versions.items()))
    return text


def settings_text(config: dict[str, Any]) -> str:
    """``6 masks per axis, r = 1, vote unanimous, window layout clipped`` for a manifest's run
    config (runs recorded before the window layout existed used the clipped one)."""
    return (f"{config.get('masks_per_axis', 'n/a')} masks per axis, r = {config.get('r', 'n/a')}, "
            f"vote {config.get('vote') or 'unanimous'}, "
            f"window layout {config.get('window_layout') or 'clipped'}")


def layout_note(published: list[dict[str, Any]], config: dict[str, Any]) -> str | None:
    """A warning under the published rows when PatchCleanser or Minority Reports figures (made
    with the reference's windows) sit beside a run in another window layout; else None."""
    reference = any("PatchCleanser" in p["defense"] or "Minority Reports" in p["defense"]
                    for p in published)
    if not reference or config.get("window_layout") == "patchcleanser":
        return None
    return ("PatchCleanser and Minority Reports figures use the reference's windows (the last "
            "one shifted inward at full size); this run's layout is "
            f"{config.get('window_layout') or 'clipped'}: compare them with a run made with "
            "--window-layout patchcleanser.")


def preprocessing_text(preprocessing: dict[str, Any] | None) -> str | None:
    """``224 px from short side 256 (bicubic), centre crop; mean 0.485,0.456,0.406, std ...``
    for a manifest's resolved preprocessing; None when the run recorded none."""
    if not preprocessing or not preprocessing.get("input_size"):
        return None
    side, resize = preprocessing["input_size"], preprocessing.get("resize")
    text = (f"{side} px from short side {resize} ({preprocessing.get('interpolation') or 'bilinear'}"
            "), centre crop" if resize else f"{side} px exact (images not resized)")
    mean, std = preprocessing.get("mean"), preprocessing.get("std")
    if mean and std:
        text += (f"; mean {','.join(f'{v:g}' for v in mean)}, "
                 f"std {','.join(f'{v:g}' for v in std)} (applied inside the model)")
    return text
