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

