"""Certification throughput of the library against the limit set by g alone.

For the CIFAR ResNet-20 (shared akamaster weights) with 2.4% patches (5 px), 6 x 6 masks and
SIN top-k 0.15, on real CIFAR-10 test JPEGs, in one run on this machine:

  g alone      images/s of the head g on batches of ``--batch-size`` stem outputs
  certify      images/s through ``Certifier.certify``, forwards per image (1 + evaluated masks),
               with the full per-mask map and with work avoidance (``full_map=False``)
  efficiency   certify images/s x forwards per image / g images/s (1.0: nothing but g costs)
  lower bound  1 + the masks of certified images only: the g runs any exact method needs

Extra runs the certifier makes beyond 1 + evaluated masks (the vanilla forward used for the
report's vanilla accuracy, and recoveries after clean-input alerts) are counted as overhead.

    python bench/bench_certify.py [--images 1000] [--batch-size 256] [--threads 2] [--json out.json]
    python bench/bench_certify.py --checkpoint runs/demo-work/model/cifar_resnet20-synthetic.pt \
        --data runs/demo-work/data/test   # the demo's model and data instead
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESNET20, cifar10_split  # noqa: E402

from pipeline.data import load_image_folder  # noqa: E402
from scalecert import CertConfig, Certifier, load_model  # noqa: E402
from scalecert.sin import prune  # noqa: E402


def g_throughput(certifier: Certifier, images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Images/s of g alone on real pruned stem outputs, at ``batch_size``."""
    predictor = certifier.predictor
    with torch.inference_mode():
        batch = predictor.prepare(images[:batch_size])
        index = torch.arange(batch_size) % len(batch)
        # the head's input exactly as certification builds it
        head_input = prune(batch.features[index], batch.keep[index]).contiguous(
            memory_format=torch.channels_last)
        predictor.head(head_input)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            predictor.head(head_input)
        return repeats * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="test images (multiple of 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="(image, mask) pairs per run of g")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--checkpoint", type=Path, default=RESNET20,
                        help="cifar_resnet20 weights (default: the shared akamaster ResNet-20)")
    parser.add_argument("--data", type=Path,
                        help="class-folder image set (default: the shared CIFAR-10 test JPEGs)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    per_class = max(1, args.images // 10)
    if args.data is None:
        images, labels = cifar10_split("test", per_class=per_class)
    else:
        images, labels = load_image_folder(args.data, per_class=per_class)
    model = load_model("cifar_resnet20", checkpoint=args.checkpoint)
    config = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6)
    certifier = Certifier(model, config, batch_size=args.batch_size)
    certifier.certify(images[:32], labels[:32])  # warm-up

    g_rate = g_throughput(certifier, images, args.batch_size, repeats=max(4, 4096 // args.batch_size))
    figures: dict[str, object] = {
        "model": "cifar_resnet20", "checkpoint": args.checkpoint.name, "patch_px": 5,
        "images": len(images),
        "batch_size": args.batch_size, "threads": args.threads, "g_images_per_s": round(g_rate, 1),
    }
    results = {}
    for mode, full_map in (("full_map", True), ("avoid", False)):
        certifier = Certifier(model, config, batch_size=args.batch_size, full_map=full_map)
        start = time.perf_counter()
        result = certifier.certify(images, labels)
        seconds = time.perf_counter() - start
        results[mode] = result
        rate = len(images) / seconds
        forwards = 1 + float(result.n_evaluated.float().mean())
        figures.update({
            f"{mode}.certify_images_per_s": round(rate, 2),
            f"{mode}.forwards_per_image": round(forwards, 2),
            f"{mode}.efficiency": round(rate * forwards / g_rate, 3),
            f"{mode}.wall_s": round(seconds, 2),
        })
    full, lean = results["full_map"], results["avoid"]
    same = all(torch.equal(getattr(full, name), getattr(lean, name))
               for name in ("prediction", "certified", "clean_output"))
    # the least work any exact method needs: M(x) for every image, every needed mask of the
    # certified ones (their certificate needs them all)
    bound = 1 + float((full.n_evaluated * full.certified).float().mean())
    figures.update({
        "outcomes_identical": same,
        "g_runs_lower_bound": round(bound, 2),
        "avoid.vs_lower_bound": round((1 + float(lean.n_evaluated.float().mean())) / bound, 2),
        "extra_runs_per_image": round(
            1 + float((lean.recovered_prediction >= 0).float().mean()), 3),  # vanilla + recovery
        "certified_accuracy": round(float(full.certified.float().mean()), 4),
        "pruned_accuracy": round(float((full.prediction == labels).float().mean()), 4),
    })
    width = max(len(key) for key in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
