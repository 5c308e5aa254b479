"""Clean and certified accuracy of the shared ResNet-20 before and after a brief fine-tune.

For 2.4% patches (5 px), 6 x 6 masks, top-k 0.15, on the first ``--test-per-class`` images of
each CIFAR-10 test class: `scalecert` (SIN-pruned, fine-tuned with winner-take-all dropout) and
`masking` (unpruned, fine-tuned with random occlusion), each from the same starting weights with
the same budget. Prints one row per (method, weights).

    python bench/brief_finetune.py [--train-per-class 500] [--epochs 3] [--test-per-class 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESNET20, cifar10_split  # noqa: E402

from scalecert import CertConfig, Certifier, load_model  # noqa: E402
from scalecert.training import FinetuneConfig, finetune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_images, train_labels = cifar10_split("train", args.train_per_class)
    test_images, test_labels = cifar10_split("test", args.test_per_class)
    print(f"train {len(train_images)} images x {args.epochs} epochs; test {len(test_images)} images")
    print(f"{'method':<10} {'weights':<12} {'vanilla':>8} {'pruned':>8} {'clean':>8} {'certified':>10} {'train_s':>8}")
    for method in ("scalecert", "masking"):
        cert = CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6, method=method)
        model = load_model("cifar_resnet20", checkpoint=RESNET20)
        for weights in ("shared", "fine-tuned"):
            seconds = 0.0
            if weights == "fine-tuned":
                start = time.perf_counter()
                finetune(model, train_images, train_labels,
                         FinetuneConfig(cert=cert, epochs=args.epochs, lr=0.01))
                seconds = time.perf_counter() - start
            result = Certifier(model, cert).certify(test_images, test_labels)
            row = [(result.vanilla_prediction == test_labels), (result.prediction == test_labels),
                   (result.clean_output == test_labels), result.certified]
            values = [100 * float(v.float().mean()) for v in row]
            print(f"{method:<10} {weights:<12} {values[0]:>7.1f}% {values[1]:>7.1f}% "
                  f"{values[2]:>7.1f}% {values[3]:>9.1f}% {seconds:>8.0f}")


if __name__ == "__main__":
    main()
