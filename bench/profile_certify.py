"""Where certification time goes: one library run (work avoidance, g as the pipeline runs it on
a CPU) under cProfile, its wall time split by stage.

CIFAR ResNet-20 fine-tuned for the method (``models/``), 5 px patches, 6 x 6 masks, top-k 0.15,
the first ``--images / 10`` CIFAR-10 test JPEGs of each class. cProfile's own overhead inflates
the Python-heavy stages a little.

    python bench/profile_certify.py [--images 1000] [--batch-size 64] [--method scalecert]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cifar10_split  # noqa: E402

from scalecert import CertConfig, Certifier, load_model  # noqa: E402
from scalecert.precision import FastPath  # noqa: E402

# stage -> (file name part, function name) of the functions whose cumulative time it is
STAGES = {
    "g forward": ("eval_with_key", "forward"),
    "g inputs: keep sets and pruning / occlusion": ("", "g_inputs"),
    "stem and SIN selection (prepare)": ("occlusion.py", "prepare"),
    "window priorities": ("", "evaluation_priority"),
    "close-call checks of the fast path": ("precision.py", "close_calls"),
    "eager fp32 re-runs of close calls": ("precision.py", "_recheck"),
    "detection outcome per image": ("certify.py", "detect_outcome"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--method", choices=("scalecert", "masking"), default="scalecert")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    images, labels = cifar10_split("test", max(1, args.images // 10))
    model = load_model("cifar_resnet20",
                       checkpoint=REPO / "models" / f"cifar10-resnet20-{args.method}-2.4.pt")
    certifier = Certifier(model, CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6,
                                            method=args.method),
                          batch_size=args.batch_size, full_map=False, fast=FastPath(fuse_bn=True))
    certifier.certify(images[:64], labels[:64])  # warm-up
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    certifier.certify(images, labels)
    profile.disable()
    wall = time.perf_counter() - start

    stats = pstats.Stats(profile).stats  # (file, line, function) -> (.., .., .., cumulative, ..)
    print(f"{args.method}: {len(images)} images in {wall:.2f} s ({len(images) / wall:.1f} "
          f"images/s), batch {args.batch_size}, {certifier.runner.pairs} rows through g, "
          f"{certifier.runner.rechecked} re-run in fp32")
    accounted = 0.0
    for stage, (file_part, function) in STAGES.items():
        seconds = sum(entry[3] for (file, _, name), entry in stats.items()
                      if name == function and file_part in file)
        accounted += seconds
        print(f"  {stage:46s} {seconds:6.2f} s {100 * seconds / wall:5.1f}%")
    rest = wall - accounted
    print(f"  {'everything else (scheduling, margins, rows)':46s} {rest:6.2f} s "
          f"{100 * rest / wall:5.1f}%")


if __name__ == "__main__":
    main()
