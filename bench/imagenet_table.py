"""Print the ImageNet table (Markdown) from a ``bench/reproduce_imagenet.sh`` folder.

Reads each run's ``report.json`` (``scalecert report``) and ``timings.tsv``, measures the bare
model's forward rate on this machine (the same model, threads and batch size as the runs'
workers), and sets the published ImageNet rows of ``pipeline/report/published_results.json``
beside the measured ones.

    python bench/imagenet_table.py runs/reproduce-imagenet [--threads 2] [--batch 64]

Tables: per (defense, patch), clean and certified accuracy with 95% Wilson intervals, vanilla
accuracy and the model's runs per image (M(x), the windows run, and for scalecert the unpruned
vanilla forward; scalecert's are runs of the head g on stem features computed once, cheaper
than a whole forward); per run, the wall time from ``timings.tsv``, images/s, and the model
runs per second against the bare model's forward rate (1.0: as fast as back-to-back forward
passes of whole images; scalecert can exceed it, its runs being head-only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

RUNS = ("k15", "k50", "k100", "patchcleanser")
MODEL = "file:examples/efficientnet_lite0.py:build"


def pct(proportion: dict[str, Any]) -> str:
    low, high = proportion["ci95"]
    return f"{100 * proportion['value']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def wall_seconds(work: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    path = work / "timings.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, _, seconds = line.partition("\t")
        totals[name] = totals.get(name, 0) + int(seconds)
    return totals


def forward_rate(threads: int, batch: int, repeats: int = 4) -> float:
    """Images/s of the bare model (eval, no grad, channels_last) on random 224 px inputs."""
    from scalecert.models import Preprocessing, load_model

    torch.set_num_threads(threads)
    model = load_model(MODEL, preprocessing=Preprocessing(
        input_size=224, resize=256, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225))).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(images)  # warm-up
        began = time.perf_counter()
        for _ in range(repeats):
            model(images)
    return batch * repeats / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the worker's)")
    parser.add_argument("--batch", type=int, default=64, help="batch (the workers' g batch)")
    args = parser.parse_args()

    rate = forward_rate(args.threads, args.batch)
    walls = wall_seconds(args.work)
    print(f"bare forward: {rate:.1f} images/s ({args.threads} threads, batch {args.batch})\n")
    print("| defense | patch | images | clean % [95% CI] | certified % [95% CI] | vanilla % "
          "| pruned % (M(x)) | model runs / image |")
    print("|---|---|---|---|---|---|---|---|")
    published: list[dict[str, Any]] = []
    throughput = []
    for run in RUNS:
        path = args.work / run / "report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        published = published or report.get("published", [])
        top_k = report["run"]["config"]["top_k"]
        groups = sorted(report["groups"], key=lambda g: (g["method"], g["patch_px"]))
        runs_total = 0.0
        for group in groups:
            method = group["method"]
            name = f"scalecert, top-k {top_k:g}" if method == "scalecert" else method
            runs_per_image = runs_of_model(group)
            runs_total += runs_per_image * group["images"]
            print(f"| {name} | {group['patch_area_percent']:.1f}% ({group['patch_px']} px) "
                  f"| {group['images']} | {pct(group['clean_accuracy'])} "
                  f"| {pct(group['certified_accuracy'])} "
                  f"| {100 * group['vanilla_accuracy']['value']:.1f} "
                  f"| {100 * group['pruned_accuracy']['value']:.1f} | {runs_per_image:.1f} |")
        wall = walls.get(run)
        if wall:
            images = groups[0]["images"]
            throughput.append(f"| {run} | {len(groups)} | {images} | {wall} "
                              f"| {images / wall:.2f} | {runs_total / wall:.1f} "
                              f"| {runs_total / wall / rate:.2f} |")
    print("\n| run | settings (method x patch) | images | wall s | images/s "
          "| model runs/s | model runs/s / bare forward |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(throughput))
    print("\n| published | patch | clean % | certified % | note |\n|---|---|---|---|---|")
    for row in published:
        if row.get("dataset") == "ImageNet":
            print(f"| {row['defense']} ({row['model']}) | {row['patch_area_percent']:g}% "
                  f"| {row['clean_accuracy']} | {row['certified_accuracy']} "
                  f"| {row.get('note') or ''} |")


def runs_of_model(group: dict[str, Any]) -> float:
    """Runs of the model (or, for scalecert, of its head g) per image: M(x), the windows run,
    and scalecert's unpruned vanilla forward (g on the same stem features)."""
    return group["masks"]["evaluated_mean"] + 1 + (group["method"] == "scalecert")


if __name__ == "__main__":
    main()
