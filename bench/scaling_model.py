"""Scaling model: wall time of a full ImageNet validation run (50,000 images, ResNet-50 at 224,
patches 1/2/3%, 6 x 6 masks, work avoidance) on 1, 8 and 64 GPUs.

What is measured on this machine, when the script runs:
  decode     seconds per image to read, decode and preprocess (short side 256, centre crop 224)
             the real ImageNet photographs of ``../shared/data/imagenet-sample`` on one core
  stem / g   the cost of ResNet-50's stem (to ``relu``) against g's, on this CPU, so the stem's
             share of a GPU's time can be added (it runs once per image for all patch sizes)
What comes from the harness JSON (``bench/harness.py`` on CIFAR-10, measured here):
  g runs per masked image by outcome (certified: every needed mask; settled: masks until the
             first disagreement), the skip lemma's share of masks (with r = 1 a recovery costs
             no run: it is the located window's prediction)
  Ray's start-up
What is an input (no ImageNet weights, no GPU here; change it when one is measured):
  ``--g-images-per-s``   g's effective throughput per GPU (bf16, channels_last, batch 256),
                         counting the fp32 re-runs of close calls (15-38% of pairs at the
                         default tolerance on CIFAR-10: measure them with ``runner.rechecked``)
  ``--certified``        the certified fraction per patch size (default: the leaderboard's
                         ScaleCert ResNet-50 figure at 2%, 55.4%, for all three)
  ``--cores-per-gpu``    decode cores per GPU (the lent H200 machine: 16)

Wall time:  T = T_fixed + max(decode, certify) on the busiest GPU, with
  certify = ceil(shards / GPUs) x shard size x (stem + M(x) + vanilla + sum over patches of
            masks run per image) / g throughput (whole shards: the GPU that gets one more shard sets the end)
  decode  = the same images x decode seconds / cores per GPU   (overlapped with certification)
  T_fixed = Ray start + actor start (``--actor-start-s``) + reading every shard back (measured
            here on local disk, serial in the driver)

    python bench/scaling_model.py [--harness bench/results/harness-<commit>.json]
                                  [--g-images-per-s 8000] [--certified 0.554 0.554 0.554]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED  # noqa: E402

from pipeline.io.certificates import read_table, table_from_dicts, to_parquet_bytes  # noqa: E402
from pipeline.io.images import Preprocess, decode  # noqa: E402
from scalecert import load_model  # noqa: E402

IMAGES = 50_000
PATCHES = (1.0, 2.0, 3.0)
GPUS = (1, 8, 64)


def decode_seconds(folder: Path, repeats: int = 3) -> float:
    """Seconds per image to decode and preprocess ImageNet photographs on one core."""
    files = sorted(folder.glob("*.JPEG"))
    if not files:
        raise SystemExit(f"{folder}: no .JPEG files (the model needs ../shared, see README)")
    blobs = [path.read_bytes() for path in files]
    preprocess = Preprocess.for_input_size(224)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for blob in blobs:
            decode(blob, preprocess)
        best = min(best, time.perf_counter() - start)
    return best / len(blobs)


def stem_share(batch: int = 16) -> float:
    """Stem time / g time of ResNet-50 at 224 on this CPU (random weights: the cost only)."""
    model = load_model("resnet50").eval().to(memory_format=torch.channels_last)
    split = model.split(None)
    images = torch.rand(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = split.stem(images)
        timings = []
        for part, inputs in ((split.stem, images), (split.head, features)):
            part(inputs)
            best = float("inf")
            for _ in range(3):  # the best of three: a busy machine only slows a part down
                start = time.perf_counter()
                part(inputs)
                best = min(best, time.perf_counter() - start)
            timings.append(best)
    return timings[0] / timings[1]


def readback_seconds_per_shard(shard_size: int, rows_per_image: int, shards: int = 20) -> float:
    """Seconds to read one shard's certificate file back (local disk), as the driver does."""
    rows = [{"run_id": "r", "image_id": f"n{i:08d}.JPEG", "label": i % 1000, "shard": 0,
             "status": "ok", "error": None, "method": "scalecert", "patch_px": 5 + p,
             "prediction": 1, "vanilla_prediction": 1, "clean_output": 1, "certified": True,
             "n_masks": 36, "n_evaluated": 33, "min_margin": 1.5, "alert_box": None,
             "recovered_prediction": None, "latency_ms": 3.0, "mask_predictions": None}
            for i in range(shard_size) for p in range(rows_per_image)]
    blob = to_parquet_bytes([table_from_dicts(rows)], {"fingerprint": "f" * 64})
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / f"part-{i:05d}.parquet" for i in range(shards)]
        for path in paths:
            path.write_bytes(blob)
        start = time.perf_counter()
        for path in paths:
            read_table(str(path))
        return (time.perf_counter() - start) / shards


def runs_per_image(certified: float, needed: float, settle: float) -> float:
    """Masks run for one image and one patch size: every needed mask if certified, else the
    masks until the first disagreement."""
    return certified * needed + (1 - certified) * settle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harness", type=Path, help="harness JSON (default: the newest in "
                        "bench/results/)")
    parser.add_argument("--g-images-per-s", type=float, nargs="+", default=[4000.0, 8000.0],
                        help="g's throughput per GPU, images/s: one table each (an input: not "
                             "measured here)")
    parser.add_argument("--certified", type=float, nargs=3, default=[0.554] * 3,
                        metavar=("P1", "P2", "P3"), help="certified fraction at 1/2/3%%")
    parser.add_argument("--cores-per-gpu", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--actor-start-s", type=float, default=15.0,
                        help="actor start on a GPU node: CUDA context, weights, compile warm-up")
    args = parser.parse_args()

    harness_path = args.harness or max((REPO / "bench" / "results").glob("harness-*.json"),
                                       key=lambda p: p.stat().st_mtime, default=None)
    if harness_path is None:
        raise SystemExit("no harness JSON: run `make bench` first, or pass --harness")
    harness = json.loads(harness_path.read_text())
    library = harness["library"]
    # CIFAR-10 measurements that carry over: masks to the first disagreement, the
    # share of masks the skip lemma spares (ImageNet's 6 x 6 family has 36 masks)
    full, lean = library["scalecert.full_map"], library["scalecert.avoid"]
    cert = library["scalecert"]["certified_accuracy"]
    needed_share = (full["g_runs_per_image"] - 1) / 36
    settle = (lean["g_runs_per_image"] - 1 - cert * (full["g_runs_per_image"] - 1)) / (1 - cert)
    decode_s = decode_seconds(SHARED / "data" / "imagenet-sample")
    stem = stem_share()
    ray_start = harness.get("ray_start_s", 10.0)
    readback_s = readback_seconds_per_shard(args.shard_size, len(PATCHES))
    shards = math.ceil(IMAGES / args.shard_size)

    runs = [runs_per_image(c, 36 * needed_share, settle) for c in args.certified]
    # the stem, M(x) and the vanilla forward once per image, shared by the patch sizes
    per_image = stem + 2 + sum(runs)
    print(f"harness {harness_path.name}: needed masks {36 * needed_share:.1f} of 36, "
          f"masks to settle {settle:.2f} per image and patch")
    print(f"measured here: decode {decode_s * 1000:.1f} ms per ImageNet image per core, "
          f"ResNet-50 stem / g cost {stem:.3f}, read-back {readback_s * 1000:.1f} ms per shard "
          f"of {args.shard_size} images")
    print(f"g runs per image: {' + '.join(f'{r:.1f}' for r in runs)} (masks, patches 1/2/3%) "
          f"+ 2 (M(x), vanilla forward) + {stem:.2f} (the stem) = {per_image:.1f}")
    fixed = ray_start + args.actor_start_s + shards * readback_s
    print(f"fixed: Ray start {ray_start:.1f} s + actor start {args.actor_start_s:.1f} s + "
          f"read-back of {shards} shards {shards * readback_s:.1f} s = {fixed:.1f} s")
    for g_rate in args.g_images_per_s:
        print(f"\ng at {g_rate:,.0f} images/s per GPU, {args.cores_per_gpu} decode cores per GPU")
        print("  GPUs  shards/GPU  images/GPU  certify s  decode s  fixed s  wall s  images/s"
              "  2% only s")
        for gpus in GPUS:
            busiest = min(IMAGES, math.ceil(shards / gpus) * args.shard_size)
            certify = busiest * per_image / g_rate
            decode_time = busiest * decode_s / args.cores_per_gpu
            wall = fixed + max(certify, decode_time)
            one_patch = fixed + max(busiest * (stem + 2 + runs[1]) / g_rate, decode_time)
            print(f"  {gpus:4d}  {math.ceil(shards / gpus):10d}  {busiest:10,d}  {certify:9.0f}  "
                  f"{decode_time:8.0f}  {fixed:7.1f}  {wall:6.0f}  {IMAGES / wall:8.0f}  "
                  f"{one_patch:9.0f}")


if __name__ == "__main__":
    main()
