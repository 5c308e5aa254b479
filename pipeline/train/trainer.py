"""``scalecert finetune``: the paper's fine-tuning on Ray Train (TorchTrainer, DDP).

Layout of ``<out>``:

- ``finetune.json``: the run's options and fingerprint, written first (a different run is
  refused, the same one resumes).
- ``ray-train/``: Ray Train's storage: one checkpoint per epoch (model, optimiser, schedule,
  metrics so far); rerunning the command resumes from the newest one.
- ``<model>-<method>.pt`` and its JSON sidecar ``.pt.json``: the final weights (the model's
  own state_dict keys, loadable by ``scalecert certify`` with the same ``--model`` spec and
  ``--checkpoint``) with the options, the data fingerprint and the metrics of every epoch.
  ``<model>`` is the spec's short name (``net-make`` for ``file:models/net.py:make``).

Each worker decodes its own slice of the training images (``records[rank::world]``) through
the same storage and decoding code as ``certify``, once, into memory as uint8: this suits
CIFAR-scale sets (50,000 32x32 images are 150 MB); ImageNet-scale fine-tuning would need a
streaming loader. Images that cannot be decoded are skipped, counted and listed in the
sidecar. The global batch is split evenly over the workers; every worker runs the same number
of steps per epoch (its slice is shuffled and wrapped around to the common length).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.compute.cluster import (
    cluster_resources,
    init_ray,
    set_torch_threads,
    worker_layout,
)
from pipeline.compute.models import load_stored_model, model_fingerprint_fields
from pipeline.io import preflight, storage
from pipeline.io.faults import environment_fault
from pipeline.io.images import Preprocess, read_labelled
from pipeline.io.sources import Dataset, ImageRecord, listing_sha256, open_dataset
from pipeline.train.config import FinetuneRun
from scalecert import __version__
from scalecert.certify import Certifier
from scalecert.errors import EnvironmentFault, InvalidOption, OutputConflict, RunFailed
from scalecert.models import Preprocessing, parse_spec
from scalecert.models.registry import save_checkpoint
from scalecert.training import (
    DefendedForward,
    sgd_with_cosine_schedule,
    train_epoch,
    training_windows,
)

MANIFEST = "finetune.json"
MANIFEST_SCHEMA = "scalecert-finetune/1"
TRAIN_STORAGE = "ray-train"
EVAL_BATCH = 256
_FAIL_AFTER_EPOCH_ENV = "SCALECERT_TEST_FAIL_AFTER_EPOCH"  # tests: interrupt a run


class FinetuneRefused(OutputConflict):
    """The output folder holds another fine-tuning run."""


@dataclass(frozen=True)
class Slice:
    """One worker's decoded images (``N x 3 x H x W`` uint8), labels, and the content digest
    (sha256 of the file bytes) of every record it read, usable or not."""

    images: torch.Tensor
    labels: torch.Tensor
    digests: dict[str, str]
    skipped: dict[str, str]  # image_id -> why it cannot be used


@dataclass(frozen=True)
class TrainJob:
    """What every Ray Train worker needs; pickled once into the trainer's config."""

    run: FinetuneRun
    records: tuple[ImageRecord, ...]
    eval_records: tuple[ImageRecord, ...]
    image_side: int
    threads: int
    start_sha256: str | None = None  # the start checkpoint's, as fingerprinted: workers check it
    preprocessing: Preprocessing | None = None  # the model's, resolved by the driver
    source_sha256: str | None = None  # the model file's, as fingerprinted: workers check it
    package_versions: dict[str, str | None] | None = None  # as fingerprinted: workers check
    progress: Any = None  # a ray.util.queue.Queue for the driver's progress bar, or None
    fail_after_epoch: int | None = None  # tests: fail once this epoch's checkpoint is saved


@dataclass
class FinetuneSummary:
    """What the driver prints at the end."""

    checkpoint: str
    sha256: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    already_done: bool = False


def final_checkpoint_location(run: FinetuneRun) -> str:
    return storage.join(run.out, f"{parse_spec(run.model).slug}-{run.method}.pt")


def load_slice(
    records: tuple[ImageRecord, ...], preprocess: Preprocess, s3: storage.S3Options,
    num_classes: int, threads: int,
) -> Slice:
    """Read and decode ``records`` (in threads); unusable ones are skipped with a reason."""

    def read(record: ImageRecord) -> tuple[str, np.ndarray | str]:
        outcome = read_labelled(record, preprocess, num_classes, s3, with_sha256=True)
        digest = outcome.sha256 or "unreadable"
        return digest, outcome.pixels if outcome.pixels is not None else str(outcome.reason)

    with ThreadPoolExecutor(max_workers=max(2, threads)) as pool:
        outcomes = list(pool.map(read, records))
    digests, skipped, arrays, labels = {}, {}, [], []
    for record, (digest, outcome) in zip(records, outcomes):
        digests[record.image_id] = digest
        if isinstance(outcome, str):
            skipped[record.image_id] = outcome
        else:
            arrays.append(outcome)
            labels.append(record.label)
    side = preprocess.size
    stacked = (np.stack(arrays) if arrays else np.zeros((0, side, side, 3), dtype=np.uint8))
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
    return Slice(images, torch.tensor(labels, dtype=torch.int64), digests, skipped)


def data_fingerprint(dataset_records: tuple[ImageRecord, ...], digests: dict[str, str]) -> str:
    """sha256 over (image_id, label, sha256 of the bytes) of every listed image, in order."""
    h = hashlib.sha256()
    for record in dataset_records:
        h.update(f"{record.image_id}\t{record.label}\t{digests[record.image_id]}\n".encode())
    return h.hexdigest()


def _to_inputs(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float().div_(255.0).contiguous(
        memory_format=torch.channels_last)


def evaluate(
    model: torch.nn.Module, run: FinetuneRun, images: torch.Tensor, labels: torch.Tensor,
    device: torch.device,
) -> dict[str, float]:
    """On held-out images: accuracy of the defended forward pass with no mask (M(x), the
    pruned model for scalecert) and certified accuracy at the trained patch size."""
    model.eval()
    cert = run.cert_config(images.shape[-1])
    certifier = Certifier(model, cert, device=device, full_map=False)
    correct = certified = 0
    with torch.no_grad():
        for start in range(0, len(images), EVAL_BATCH):
            batch = _to_inputs(images[start:start + EVAL_BATCH], device)
            target = labels[start:start + EVAL_BATCH].to(device)
            result = certifier.certify(batch, target)
            correct += int((result.prediction == target).sum())
            certified += int(result.certified.sum())
    model.train()
    n = max(1, len(images))
    return {"eval_accuracy": correct / n, "eval_certified": certified / n}


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (one process per worker, DDP between them)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: TrainJob = payload["job"]
    run = job.run
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    set_torch_threads(job.threads)
    device = ray.train.torch.get_device()
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    model = load_stored_model(run.model, run.checkpoint, s3, expect_sha256=job.start_sha256,
                              preprocessing=job.preprocessing or run.preprocessing(),
                              expect_source_sha256=job.source_sha256,
                              expect_package_versions=job.package_versions)
    preprocess = Preprocess.of(model.preprocessing)
    settings = run.finetune_config(job.image_side)
    cert = settings.cert

    mine = load_slice(job.records[rank::world], preprocess, s3, model.num_classes, job.threads)
    shared: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(shared, (mine.digests, mine.skipped, len(mine.labels)))
    else:
        shared = [(mine.digests, mine.skipped, len(mine.labels))]
    digests = {k: v for part in shared for k, v in part[0].items()}
    skipped = {k: v for part in shared for k, v in part[1].items()}
    usable = sum(part[2] for part in shared)
    if min(part[2] for part in shared) == 0:
        raise InvalidOption(f"--data: a worker has no usable image ({usable} usable, "
                         f"{len(skipped)} skipped of {len(job.records)}); use fewer --workers")
    fingerprint = data_fingerprint(job.records, digests)
    evaluation = None
    if rank == 0 and job.eval_records:
        evaluation = load_slice(job.eval_records, preprocess, s3, model.num_classes, job.threads)

    local_batch = run.batch_size // world
    per_worker = math.ceil(usable / world)
    steps = math.ceil(per_worker / local_batch)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # A folder of this worker's own: as_directory() shares one download among the workers
        # of a node, and a worker read a state.pt that another was still writing or removing.
        with tempfile.TemporaryDirectory(prefix=f"scalecert-resume-{rank}-") as folder:
            checkpoint.to_directory(folder)
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    model.to(device, memory_format=torch.channels_last).train()
    trained = ray.train.torch.prepare_model(DefendedForward(model, cert))
    optimizer, schedule = sgd_with_cosine_schedule(trained.parameters(), settings, steps)
    history: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history = json.loads(state["history"])
    boxes = training_windows(cert, (job.image_side, job.image_side))

    for epoch in range(len(history) + 1, settings.epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(
            settings.seed * 1_000_003 + epoch * 1_009 + rank)
        order = torch.randperm(len(mine.labels), generator=generator)
        order = order.repeat(math.ceil(per_worker / len(order)))[:per_worker]

        def on_step(step: int, steps: int, epoch: int = epoch) -> None:
            if rank == 0 and job.progress is not None:
                job.progress.put_nowait(("step", epoch, step, steps))

        totals = train_epoch(trained, mine.images, mine.labels, order, local_batch, boxes,
                             settings, optimizer, schedule, generator, device, on_step)
        sums = torch.tensor([totals.loss_sum, totals.correct, totals.images],
                            dtype=torch.float64)  # loss * n, correct, n
        if world > 1:
            dist.all_reduce(sums)
        metrics: dict[str, Any] = {
            "epoch": epoch, "loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2]),
            "images": int(sums[2]), "lr": schedule.get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 2),
        }
        if evaluation is not None:
            metrics.update(evaluate(model, run, evaluation.images, evaluation.labels, device))
            metrics["eval_images"] = len(evaluation.labels)
        history.append(metrics)
        report = {**metrics, "data_fingerprint": fingerprint, "usable": usable,
                  "skipped": json.dumps(skipped)}
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="scalecert-train-") as folder:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "history": json.dumps(history)},
                           Path(folder) / "state.pt")
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
            if job.progress is not None:
                job.progress.put_nowait(("epoch", metrics))
        else:
            ray.train.report(report)
        if epoch == job.fail_after_epoch:
            # Rank 0 returns from report() only after its checkpoint upload; another rank
            # returns at once. Raising before every rank's report is queued lets Ray's
            # controller see the failure first and drop the epoch's checkpoint.
            if world > 1:
                dist.barrier()
            raise RuntimeError(f"{_FAIL_AFTER_EPOCH_ENV}={epoch}: stopping as asked (tests)")


def _manifest(run: FinetuneRun, dataset: Dataset, start: torch.nn.Module) -> dict[str, Any]:
    """The run's fingerprint fields (options, start weights, model file or packages, the
    listing, the version) and what it trains on; the fingerprint names the run."""
    fields = {"options": run.fingerprint_fields(),
              "start_checkpoint_sha256": getattr(start, "checkpoint_sha256", None),
              "listing_sha256": listing_sha256(dataset.records), "version": __version__,
              **model_fingerprint_fields(run.model, start)}
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"schema": MANIFEST_SCHEMA, "fingerprint": fingerprint, **fields,
            "classes": list(dataset.classes), "images": len(dataset.records)}


def check_output(run: FinetuneRun, manifest: dict[str, Any], s3: storage.S3Options) -> bool:
    """Refuse an output folder of another run (read only). True when the final checkpoint of
    this very run already exists (nothing to do)."""
    location = storage.join(run.out, MANIFEST)
    if storage.exists(location, s3):
        try:
            previous = json.loads(storage.read_text(location, s3))
        except (ValueError, OSError) as exc:
            raise FinetuneRefused(f"{location}: unreadable ({exc}); choose another --out") from exc
        if previous.get("fingerprint") != manifest["fingerprint"]:
            raise FinetuneRefused(
                f"{run.out} holds another fine-tuning run (fingerprint "
                f"{previous.get('fingerprint')}, this run {manifest['fingerprint']}): different "
                "data, weights or options; choose another --out")
        return storage.exists(final_checkpoint_location(run), s3)
    return False


def write_manifest(run: FinetuneRun, manifest: dict[str, Any], s3: storage.S3Options) -> None:
    location = storage.join(run.out, MANIFEST)
    if not storage.exists(location, s3):
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        storage.write_text_atomic(location, text, s3)


def _ray_storage(run: FinetuneRun, s3: storage.S3Options) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train under ``<out>/ray-train``."""
    location = storage.join(run.out, TRAIN_STORAGE)
    if storage.is_s3(location):
        return location.removeprefix("s3://"), s3.filesystem()
    return str(Path(location).resolve()), None


def _layout(run: FinetuneRun) -> tuple[int, float, bool]:
    """(workers, CPUs per worker, use GPU) for the connected cluster, by the rules certify's
    workers follow (:func:`~pipeline.compute.cluster.worker_layout`)."""
    resources = cluster_resources(run.device, run.address)
    layout = worker_layout(run.device, resources, run.workers, limit=1 << 30)
    if run.batch_size % layout.workers:
        raise InvalidOption(f"--batch-size: {run.batch_size} is not a multiple of the "
                            f"{layout.workers} workers")
    return layout.workers, max(1.0, layout.cpus), layout.device == "cuda"


def _final_model(
    run: FinetuneRun, checkpoint: Any, job: TrainJob, num_classes: int, s3: storage.S3Options,
) -> tuple[torch.nn.Module, list[dict]]:
    """The last epoch's weights in a fresh model of the same spec (the same file, checked)."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    model = load_stored_model(run.model, None, s3, preprocessing=job.preprocessing,
                              num_classes=num_classes, expect_source_sha256=job.source_sha256,
                              expect_package_versions=job.package_versions)
    model.load_state_dict(state["model"])
    return model.eval(), json.loads(state["history"])


def _write_final(run: FinetuneRun, model: torch.nn.Module, sidecar: dict[str, Any],
                 s3: storage.S3Options) -> tuple[str, str]:
    location = final_checkpoint_location(run)
    if not storage.is_s3(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return location, save_checkpoint(model, location, sidecar)
    with tempfile.TemporaryDirectory(prefix="scalecert-final-") as folder:
        local = Path(folder) / "model.pt"
        sha256 = save_checkpoint(model, local, sidecar)
        storage.write_bytes_atomic(location, local.read_bytes(), s3)
        storage.write_bytes_atomic(location + ".json", Path(f"{local}.json").read_bytes(), s3)
    return location, sha256


def _pump(progress: Any, done: threading.Event, on_event: Callable[[tuple], None]) -> None:
    """Forward the workers' progress events to ``on_event`` until training has ended."""
    while not done.is_set() or not progress.empty():
        try:
            event = progress.get(timeout=0.5)
        except queue.Empty:
            continue
        except Exception:  # the queue actor went away with the trainer: nothing more to show
            return
        on_event(event)


def run_finetune(
    run: FinetuneRun, on_event: Callable[[tuple], None] | None = None
) -> FinetuneSummary:
    """Validate, write the manifest, train on Ray (resuming when possible), save the result.

    ``on_event`` receives the workers' progress while training runs: ``("step", epoch, step,
    steps)`` after each optimiser step and ``("epoch", metrics)`` after each epoch.
    """
    started = time.perf_counter()
    # Ray Train workers run in their own folders: every local path must be absolute
    run = replace(run, data=storage.normalise(run.data), out=storage.normalise(run.out),
                  checkpoint=run.checkpoint and storage.normalise(run.checkpoint),
                  eval_data=run.eval_data and storage.normalise(run.eval_data),
                  model=parse_spec(run.model).with_absolute_path().text)
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    preflight.check_locations(run.out, run.reads(), s3)
    dataset = open_dataset(run.data, s3)
    records = dataset.records[:run.limit]
    dataset = Dataset(dataset.root, dataset.layout, dataset.classes, records)
    eval_records: tuple[ImageRecord, ...] = ()
    if run.eval_data is not None:
        eval_records = open_dataset(run.eval_data, s3).records[:run.eval_limit]
    # refuses a bad spec or bad weights before work
    start = load_stored_model(run.model, run.checkpoint, s3, preprocessing=run.preprocessing())
    image_side = start.input_size
    if len(dataset.classes) > start.num_classes:
        raise InvalidOption(f"--data: {len(dataset.classes)} classes but model {run.model} has "
                         f"{start.num_classes} outputs")
    run.finetune_config(image_side)
    manifest = _manifest(run, dataset, start)
    if check_output(run, manifest, s3):
        location = final_checkpoint_location(run)
        sidecar = json.loads(storage.read_text(location + ".json", s3))
        sha256 = hashlib.sha256(storage.read_bytes(location, s3)).hexdigest()
        return FinetuneSummary(location, sha256, sidecar["epochs"], sidecar["data"]["usable"],
                               len(sidecar["data"]["skipped"]), time.perf_counter() - started,
                               already_done=True)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    if run.device == "cuda" and run.address is None and not torch.cuda.is_available():
        raise InvalidOption("--device cuda: this machine has no CUDA device (torch sees none)")
    owned = init_ray(run.address)
    try:
        workers, cpus, use_gpu = _layout(run)  # refuses before anything is written
        write_manifest(run, manifest, s3)
        progress = Queue(actor_options={"num_cpus": 0}) if on_event is not None else None
        job = TrainJob(run=run, records=records, eval_records=eval_records,
                       image_side=image_side, threads=int(cpus),
                       start_sha256=manifest["start_checkpoint_sha256"],
                       preprocessing=start.preprocessing, source_sha256=start.source_sha256,
                       package_versions=dict(start.package_versions), progress=progress,
                       fail_after_epoch=_fail_after_epoch())
        storage_path, filesystem = _ray_storage(run, s3)
        trainer = TorchTrainer(
            train_worker, train_loop_config={"job": job},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name=manifest["fingerprint"], storage_path=storage_path,
                storage_filesystem=filesystem,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        result = _fit(trainer, progress, on_event)
    finally:
        if owned:
            ray.shutdown()
    if result.checkpoint is None:
        raise RunFailed(f"{run.out}: training ended without a checkpoint")
    model, history = _final_model(run, result.checkpoint, job, start.num_classes, s3)
    metrics = result.metrics or {}
    skipped = json.loads(metrics.get("skipped", "{}"))
    sidecar = {
        "schema": "scalecert-checkpoint/1",
        "model": run.model, "method": run.method,
        "made_by": run.command_line(),
        "finetune": run.finetune_config(image_side).to_dict(),
        "run_fingerprint": manifest["fingerprint"],
        "start_checkpoint": {"location": run.checkpoint,
                             "sha256": manifest["start_checkpoint_sha256"]},
        "model_source_sha256": start.source_sha256,
        "package_versions": dict(start.package_versions),
        "preprocessing": start.preprocessing.declared(),
        "data": {"source": run.data, "listed": len(records), "usable": metrics.get("usable"),
                 "skipped": skipped, "fingerprint": metrics.get("data_fingerprint")},
        "eval_data": ({"source": run.eval_data, "images": len(eval_records)}
                      if run.eval_data else None),
        "epochs": history,
        "workers": workers, "device": "cuda" if use_gpu else "cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "wall_s": round(time.perf_counter() - started, 1),
        "scalecert_version": __version__,
    }
    location, sha256 = _write_final(run, model, sidecar, s3)
    return FinetuneSummary(location, sha256, history, int(metrics.get("usable", 0)),
                           len(skipped), time.perf_counter() - started)


def _fail_after_epoch() -> int | None:
    value = os.environ.get(_FAIL_AFTER_EPOCH_ENV)
    return int(value) if value else None


def _fit(trainer: Any, progress: Any, on_event: Callable[[tuple], None] | None) -> Any:
    """``trainer.fit()``, with the workers' progress forwarded while it runs."""
    if progress is None or on_event is None:
        return _fit_or_explain(trainer)
    done = threading.Event()
    pump = threading.Thread(target=_pump, args=(progress, done, on_event), daemon=True)
    pump.start()
    try:
        return _fit_or_explain(trainer)
    finally:
        done.set()
        pump.join(timeout=5)


def _fit_or_explain(trainer: Any) -> Any:
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        fault = environment_fault(exc)
        if fault is not None:  # a full disk, S3 gone: the epochs checkpointed so far are kept
            raise EnvironmentFault(fault.location, fault.problem,
                                   "training stopped; rerun the same command to resume from "
                                   "its last checkpointed epoch") from exc
        print(f"training failed: {exc}", file=sys.stderr)
        raise RunFailed(f"training failed: {exc}") from exc
