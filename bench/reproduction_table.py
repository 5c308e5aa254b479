"""Print the CIFAR-10 reproduction table (Markdown) from a ``bench/reproduce_cifar.sh`` folder.

Reads each certification run's ``report.json`` (written by ``scalecert report``), each
fine-tune's checkpoint sidecar, and ``timings.tsv`` (wall seconds per step), and sets the
measured rows beside the published CIFAR-10 rows of ``pipeline/report/published_results.json``.

    python bench/reproduction_table.py runs/reproduce-cifar
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from pipeline.report.published import load_published

PATCHES = ((2, "0.4%"), (5, "2.4%"))
MODEL = "cifar_resnet20"


def pct(proportion: dict[str, Any]) -> str:
    low, high = proportion["ci95"]
    return f"{100 * proportion['value']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def timings(work: Path) -> dict[str, int]:
    """Wall seconds per step, summed over the script's invocations (a resumed step counts
    every part; a rerun that finds the step done adds a few seconds)."""
    path = work / "timings.tsv"
    totals: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, seconds = line.partition("\t")
            if seconds:
                totals[name] = totals.get(name, 0) + int(seconds)
    return totals


def train_minutes(sidecar: dict[str, Any]) -> float:
    """Minutes of training steps, summed over the epochs (also across the invocations of a
    resumed run); start-up, decoding and the per-epoch evaluation are not included."""
    return sum(epoch["seconds"] for epoch in sidecar["epochs"]) / 60


def epochs(sidecar: dict[str, Any]) -> str:
    count = len(sidecar["epochs"])
    return f"{count} epoch{'' if count == 1 else 's'}"


def group(report: dict[str, Any], method: str, patch_px: int) -> dict[str, Any] | None:
    return next((g for g in report["groups"]
                 if g["method"] == method and g["patch_px"] == patch_px), None)


def main_table(work: Path, seconds: dict[str, int]) -> list[str]:
    lines = ["| defense | source | patch | clean % [95% CI] | certified % [95% CI] | "
             "pruned % | masks run / image (of 36) | fine-tune (training steps) | certify wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in ("scalecert", "masking"):
        report = read_json(work / f"certify-{method}" / "report.json")
        sidecar = read_json(work / f"finetune-{method}" / f"{MODEL}-{method}.pt.json")
        if report is None or sidecar is None:
            lines.append(f"| {method} | measured | – | not run yet | | | | | |")
            continue
        training = (f"{epochs(sidecar)}, {train_minutes(sidecar):.0f} min, "
                    f"{sidecar['workers']} workers")
        wall = seconds.get(f"certify certify-{method}")
        for px, share in PATCHES:
            g = group(report, method, px)
            if g is None:
                continue
            lines.append(
                f"| {method} (ResNet-20) | measured | {share} ({px} px) | "
                f"{pct(g['clean_accuracy'])} | {pct(g['certified_accuracy'])} | "
                f"{100 * g['pruned_accuracy']['value']:.1f} | {g['masks']['evaluated_mean']:.1f} | "
                f"{training} | {'' if wall is None else f'{wall} s (both patches)'} |")
    for row in load_published():
        if row.dataset == "CIFAR-10" and row.source == "scalecert-paper":
            lines.append(f"| {row.defense} | paper | {row.patch_area_percent:g}% | "
                         f"{row.clean_accuracy:.1f} | {row.certified_accuracy:.1f} | | | | |")
    return lines


def budget_row(work: Path, certify_dir: str, finetune_dir: str, label: str,
               method: str = "scalecert") -> str | None:
    """A row of the sweep or ablation table: one fine-tune certified at 2.4%."""
    report = read_json(work / certify_dir / "report.json")
    sidecar = read_json(work / finetune_dir / f"{MODEL}-{method}.pt.json")
    if report is None or sidecar is None or (g := group(report, method, 5)) is None:
        return None
    return (f"| {label} | {pct(g['clean_accuracy'])} | {pct(g['certified_accuracy'])} | "
            f"{100 * g['pruned_accuracy']['value']:.1f} | {g['masks']['evaluated_mean']:.1f} | "
            f"{epochs(sidecar)}, {train_minutes(sidecar):.0f} min |")


def budget_table(work: Path, rows: list[tuple[str, ...]]) -> list[str]:
    lines = [budget_row(work, *row) for row in rows]
    found = [line for line in lines if line is not None]
    if not found:
        return ["(not run)"]
    return ["| setting | clean % [95% CI] | certified % at 2.4% [95% CI] | pruned % | "
            "masks run / image | fine-tune |", "|---|---|---|---|---|---|", *found]


SWEEP = (*((f"sweep-certify-k{k}", f"sweep-finetune-k{k}", f"scalecert top-k {float(k):.0%}")
           for k in ("0.10", "0.15", "0.20", "0.30", "0.50", "1.0")),
         ("sweep-certify-masking", "sweep-finetune-masking", "masking (same budget)", "masking"))
# a worst-window epoch on each method's fine-tune, scalecert at top-k 50% for 4 + 12 epochs,
# and 8 more worst-window epochs on each: the recommended checkpoints of models/best.json
IMPROVED = (*((f"certify-ww-{m}", f"finetune-ww-{m}", f"{m} + 1 worst-window epoch", m)
              for m in ("scalecert", "masking")),
            ("certify-k50", "finetune-k50", "scalecert top-k 50%, 4 + 12 epochs (these 12 shown)"),
            ("certify-k50-ww", "finetune-k50-ww", "scalecert top-k 50% + 1 worst-window epoch"),
            ("certify-k50-ww70", "finetune-k50-ww70",
             "scalecert top-k 50% + 1 worst-window epoch at top-k 70% (certified at 70%)"),
            ("certify-ww70x9", "finetune-ww70x9",
             "the row above + 8 worst-window epochs at top-k 70% (lr 0.01)"),
            ("certify-wwx9-masking", "finetune-wwx9-masking",
             "masking + 1 + 8 worst-window epochs (lr 0.01)", "masking"))
ABLATIONS = (
    ("sweep-certify-k0.15", "sweep-finetune-k0.15",
     "reference: top-k 15%, layer relu, windows in half the steps"),
    ("ablation-certify-windows-always", "ablation-finetune-windows-always",
     "a window in every training step (--mask-probability 1.0)"),
    ("ablation-certify-layer1", "ablation-finetune-layer1",
     "superficial layer layer1 (after the first stage) instead of relu"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the reproduce_cifar.sh working folder")
    args = parser.parse_args()
    seconds = timings(args.work)
    print(f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores; test set: 10,000 CIFAR-10 JPEGs\n")
    print("\n".join(main_table(args.work, seconds)))
    print("\nImproved fine-tunes (models/best.json names the recommended ones), at 2.4%:\n")
    print("\n".join(budget_table(args.work, list(IMPROVED))))
    print("\nTop-k sweep (fine-tuned at each k with the sweep budget):\n")
    print("\n".join(budget_table(args.work, list(SWEEP))))
    print("\nAblations (scalecert, sweep budget, top-k 15%):\n")
    print("\n".join(budget_table(args.work, list(ABLATIONS))))


if __name__ == "__main__":
    main()
