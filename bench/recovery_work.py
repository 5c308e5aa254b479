"""PatchCleanser's work avoidance against the full computation, on real CIFAR-10 test JPEGs.

Certifies the first ``--per-class`` test images of each class with a recovery method twice,
running every one- and two-mask input (``full_map=True``) and with work avoidance, and prints
as JSON: model runs per image (mean, p50, p95) in both modes, clean (recovered) and certified
accuracy with 95% Wilson intervals, and whether every outcome (certified, recovered label,
one-mask map) is identical. Exits 1 when an outcome differs.

    python bench/recovery_work.py [--method patchcleanser] [--per-class 100]
        [--checkpoint models/cifar10-resnet20-masking-2.4.pt] [--masks-per-axis 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cifar10_split  # noqa: E402

from pipeline.report.reduce import wilson  # noqa: E402
from scalecert import CertConfig, Certifier, load_model  # noqa: E402


def runs_summary(runs: torch.Tensor) -> dict[str, float]:
    values = runs.double()
    return {"mean": float(values.mean()), "p50": float(values.quantile(0.5)),
            "p95": float(values.quantile(0.95)), "total": int(runs.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="patchcleanser",
                        choices=("patchcleanser", "patchcleanser_sin"))
    parser.add_argument("--checkpoint", type=Path,
                        default=REPO / "models" / "cifar10-resnet20-masking-2.4.pt")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--masks-per-axis", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = cifar10_split("test", args.per_class)
    model = load_model("cifar_resnet20", args.checkpoint)
    config = CertConfig(patch_px=5, method=args.method, masks_per_axis=args.masks_per_axis)
    results, seconds = {}, {}
    for full in (True, False):
        began = time.perf_counter()
        results[full] = Certifier(model, config, full_map=full).certify(images, labels)
        seconds[full] = time.perf_counter() - began
    full, lean = results[True], results[False]
    identical = {name: bool(torch.equal(getattr(full, name), getattr(lean, name)))
                 for name in ("certified", "clean_output", "mask_predictions")}
    n = len(labels)
    report = {
        "method": args.method, "checkpoint": str(args.checkpoint), "images": n,
        "patch_px": 5, "masks_per_axis": args.masks_per_axis,
        "clean_accuracy": wilson(int((lean.clean_output == labels).sum()), n).to_dict(),
        "certified_accuracy": wilson(int(lean.certified.sum()), n).to_dict(),
        "runs_per_image": {"full": runs_summary(full.n_evaluated),
                           "work_avoidance": runs_summary(lean.n_evaluated)},
        "seconds": {"full": seconds[True], "work_avoidance": seconds[False]},
        "identical_outcomes": identical,
    }
    print(json.dumps(report, indent=1))
    if not all(identical.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
