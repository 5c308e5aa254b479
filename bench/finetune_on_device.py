"""Fine-tune several candidate checkpoints side by side on one accelerator, with the library's
one-device loop (:func:`scalecert.finetune`, no Ray), then certify each on a test split.

For a GPU machine that lacks the pipeline's dependencies (Ray): it needs torch, numpy, Pillow
and pyarrow only. Every candidate gets the same number of epochs (an equal budget), chosen
from a short timing probe of each so that the whole sweep fits ``--budget-s``; the candidates
then train concurrently, one process each, and write their checkpoint (with a sidecar like
``scalecert finetune``'s) after every epoch, so a run cut short still leaves its last epoch.
Certification uses the library :class:`~scalecert.Certifier` with work avoidance, whose
outcomes equal the pipeline's (pinned by the tests).

    python bench/finetune_on_device.py --train cifar10/train --test cifar10/test \\
        --out runs/device --budget-s 300 --patch-px 5 \\
        --candidate masking-ww=masking:models/cifar10-resnet20-masking-ww-2.4.pt:0.15:0.01 \\
        --candidate scalecert-ww=scalecert:models/...-k50-ww70-2.4.pt:0.7:0.01

A candidate is ``NAME=METHOD:START_CHECKPOINT:TOP_K:LR``. Results go to ``OUT/results.json``
and one line each to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.compute.batches import load_image_folder  # noqa: E402
from pipeline.io.sources import listing_sha256, open_dataset  # noqa: E402
from scalecert import __version__  # noqa: E402
from scalecert.certify import Certifier  # noqa: E402
from scalecert.config import CertConfig  # noqa: E402
from scalecert.errors import InvalidOption  # noqa: E402
from scalecert.models import load_model  # noqa: E402
from scalecert.models.registry import file_sha256, save_checkpoint  # noqa: E402
from scalecert.training import (  # noqa: E402
    DefendedForward, FinetuneConfig, finetune, sgd_with_cosine_schedule, train_epoch,
    training_windows)

MODEL = "cifar_resnet20"


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str
    start: str
    top_k: float
    lr: float

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        try:
            name, rest = text.split("=", 1)
            method, start, top_k, lr = rest.rsplit(":", 3)
            candidate = cls(name, method, start, float(top_k), float(lr))
        except ValueError:
            raise InvalidOption(f"--candidate {text!r}: expected NAME=METHOD:START:TOP_K:LR")
        if not Path(candidate.start).is_file():
            raise InvalidOption(f"--candidate {name}: start checkpoint {start} not found")
        return candidate


def cert_config(candidate: Candidate, patch_px: int) -> CertConfig:
    return CertConfig(patch_px=patch_px, method=candidate.method, top_k=candidate.top_k,
                      masks_per_axis=6)


def finetune_config(candidate: Candidate, args: argparse.Namespace, epochs: int) -> FinetuneConfig:
    return FinetuneConfig(cert=cert_config(candidate, args.patch_px), epochs=epochs,
                          lr=candidate.lr, objective=args.objective, mask_probability=1.0,
                          seed=args.seed)


def load_uint8(folder: str, limit_per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_image_folder(folder, per_class=limit_per_class)
    return images.mul(255).round_().to(torch.uint8), labels


def probe_epoch_seconds(candidate: Candidate, args: argparse.Namespace, images: torch.Tensor,
                        labels: torch.Tensor, device: torch.device) -> float:
    """Seconds one epoch of ``candidate`` takes alone on ``device``, from timed steps after
    warm-up steps (a throwaway copy of the start weights)."""
    model = load_model(MODEL, checkpoint=candidate.start).to(
        device, memory_format=torch.channels_last).train()
    config = finetune_config(candidate, args, epochs=1)
    forward = DefendedForward(model, config.cert)
    boxes = training_windows(config.cert, tuple(images.shape[2:]))
    optimizer, schedule = sgd_with_cosine_schedule(model.parameters(), config, 1000)
    generator = torch.Generator().manual_seed(0)
    warm, timed = 5, args.probe_steps
    order = torch.randperm(len(images), generator=generator)

    def steps(count: int, offset: int) -> None:
        part = order[offset * config.batch_size:(offset + count) * config.batch_size]
        train_epoch(forward, images, labels, part, config.batch_size, boxes, config, optimizer,
                    schedule, generator, device)

    steps(warm, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    steps(timed, warm)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / timed
    return per_step * math.ceil(len(images) / config.batch_size)


def train_one(args: argparse.Namespace) -> None:
    """Child process: fine-tune one candidate, checkpointing after every epoch."""
    candidate = Candidate.parse(args.candidate[0])
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    data = torch.load(args.data_file, weights_only=True)
    images, labels = data["images"].to(device), data["labels"].to(device)
    model = load_model(MODEL, checkpoint=candidate.start)
    config = finetune_config(candidate, args, epochs=args.epochs)
    out = Path(args.out) / f"{candidate.name}.pt"
    history: list[dict] = []
    started = last = time.perf_counter()

    def on_epoch(metrics) -> None:
        nonlocal last
        now = time.perf_counter()
        history.append({**asdict(metrics), "seconds": round(now - last, 1)})
        last = now
        was_training = model.training
        save_checkpoint(model, out, sidecar(candidate, config, data, history, now - started))
        model.train(was_training)
        print(f"{candidate.name}: epoch {metrics.epoch}/{config.epochs} loss {metrics.loss:.3f} "
              f"train acc {metrics.accuracy:.3f} ({history[-1]['seconds']} s)", flush=True)

    finetune(model, images, labels, config, device=device, on_epoch=on_epoch)


def sidecar(candidate: Candidate, config: FinetuneConfig, data: dict, history: list[dict],
            wall_s: float) -> dict:
    return {
        "schema": "scalecert-checkpoint/1",
        "scalecert_version": __version__,
        "method": candidate.method,
        "model": MODEL,
        "finetune": {**config.to_dict(), "cert": json.loads(config.cert.to_json())},
        "start_checkpoint": {"location": candidate.start, "sha256": file_sha256(candidate.start)},
        "data": {"source": data["source"], "listing_sha256": data["listing_sha256"],
                 "usable": int(len(data["labels"]))},
        "epochs": history,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "workers": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "made_by": "bench/finetune_on_device.py (scalecert.finetune on one device), "
                   f"candidate {candidate.name}",
        "wall_s": round(wall_s, 1),
    }


def certify_folder(checkpoint: str, cert: CertConfig, images: torch.Tensor,
                   labels: torch.Tensor, device: torch.device) -> dict:
    model = load_model(MODEL, checkpoint=checkpoint)
    certifier = Certifier(model, cert, device=device, full_map=False)
    certified = correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            batch = images[start:start + 1000].to(device).float().div_(255.0)
            target = labels[start:start + 1000].to(device)
            result = certifier.certify(batch, target)
            certified += int(result.certified.sum())
            correct += int((result.prediction.to(device) == target).sum())
    n = len(images)
    return {"certified": certified / n, "clean": correct / n, "images": n}


def sweep(args: argparse.Namespace) -> None:
    candidates = [Candidate.parse(text) for text in args.candidate]
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise InvalidOption(f"--candidate: names must differ, got {names}")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    images, labels = load_uint8(args.train, args.per_class)
    listing = open_dataset(args.train).records
    data_file = Path(tempfile.gettempdir()) / f"finetune-on-device-{os.getpid()}.pt"
    torch.save({"images": images, "labels": labels, "source": args.train,
                "listing_sha256": listing_sha256(listing)}, data_file)
    print(f"decoded {len(images)} training images in {time.perf_counter() - began:.0f} s",
          flush=True)

    seconds: dict[str, float] = {}
    if args.epochs:  # fixed: no probe needed
        epochs = args.epochs
    else:
        gpu_images, gpu_labels = images.to(device), labels.to(device)
        seconds = {c.name: probe_epoch_seconds(c, args, gpu_images, gpu_labels, device)
                   for c in candidates}
        del gpu_images, gpu_labels
        epochs = max(1, min(args.max_epochs, int(args.budget_s // sum(seconds.values()))))
    print(f"epoch seconds alone: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; "
          f"{epochs} epochs each", flush=True)

    children = {}
    for candidate, text in zip(candidates, args.candidate):
        command = [sys.executable, __file__, "--train-one", "--candidate", text,
                   "--data-file", str(data_file), "--epochs", str(epochs),
                   "--out", str(out), "--device", args.device, "--patch-px", str(args.patch_px),
                   "--objective", args.objective, "--seed", str(args.seed)]
        children[candidate.name] = subprocess.Popen(command)
    deadline = time.perf_counter() + args.deadline_s
    for name, child in children.items():
        try:
            child.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            print(f"{name}: stopped at the deadline; its last finished epoch is kept", flush=True)
    print(f"training done at {time.perf_counter() - began:.0f} s", flush=True)

    test_images, test_labels = load_uint8(args.test, args.test_per_class)
    results = {"epochs": epochs, "epoch_seconds_alone": seconds, "candidates": {}}
    for candidate in candidates:
        cert = cert_config(candidate, args.patch_px)
        trained = out / f"{candidate.name}.pt"
        row = {}
        starts = () if args.skip_start else (("start_point", Path(candidate.start)),)
        for key, checkpoint in (("trained", trained), *starts):
            if not checkpoint.is_file():
                continue
            try:  # one failure must not cost the other rows
                row[key] = certify_folder(str(checkpoint), cert, test_images, test_labels, device)
            except Exception:  # noqa: BLE001 - reported in the results, run goes on
                row[key] = {"error": traceback.format_exc()}
                print(row[key]["error"], flush=True)
        if trained.is_file():
            row["epochs_done"] = len(json.loads(Path(f"{trained}.json").read_text())["epochs"])
            row["sha256"] = file_sha256(trained)
        results["candidates"][candidate.name] = {**asdict(candidate), **row}
        print(f"{candidate.name}: {json.dumps(row)}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    data_file.unlink()
    print(f"all done at {time.perf_counter() - began:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", help="training class folder (<class>/<image>)")
    parser.add_argument("--test", help="test class folder, certified after training")
    parser.add_argument("--out", required=True)
    parser.add_argument("--candidate", action="append", required=True,
                        help="NAME=METHOD:START_CHECKPOINT:TOP_K:LR (repeatable)")
    parser.add_argument("--patch-px", type=int, default=5)
    parser.add_argument("--objective", default="worst-window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="training time the sweep should fit, all candidates together")
    parser.add_argument("--deadline-s", type=float, default=420.0,
                        help="training processes still running then are stopped")
    parser.add_argument("--epochs", type=int, default=0, help="fixed epochs (0: from the probe)")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--probe-steps", type=int, default=15)
    parser.add_argument("--per-class", type=int, default=None,
                        help="first N training images per class (smoke tests)")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="first N test images per class (smoke tests)")
    parser.add_argument("--skip-start", action="store_true",
                        help="certify the trained checkpoints only, not the start points")
    parser.add_argument("--train-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        train_one(args) if args.train_one else sweep(args)
    except InvalidOption as error:
        raise SystemExit(f"finetune_on_device: {error}")


if __name__ == "__main__":
    main()
