"""The shard worker: loads the model once, certifies whole shards, writes one Parquet file each.

``ShardWorker`` is a plain class (Ray's batch-inference pattern: the model is loaded in
``__init__``); the driver wraps it in a Ray actor. For one shard it reads and decodes the images
in I/O threads, a chunk ahead of certification, certifies them chunk by chunk for every (patch
size, method) — sharing each chunk's decode and stem across them — and writes
``part-<shard>.parquet`` atomically, so a shard is either completely written or absent.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.certificates import RowContext, certified_rows, error_rows, to_parquet_bytes
from pipeline.config import RunConfig
from pipeline.images import ImageError, Preprocess, decode, to_batch
from pipeline.sources import ImageRecord
from scalecert import Certifier, load_model
from scalecert.models import StagedClassifier


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, picklable for Ray."""

    run: RunConfig
    run_id: str
    metadata: dict[str, Any]  # goes into every Parquet file's schema metadata
    patch_pixels: tuple[int, ...]
    image_side: int
    device: str = "cpu"
    threads: int = 1
    chunk_images: int = 256


@dataclass(frozen=True)
class ShardTask:
    index: int
    records: tuple[ImageRecord, ...]
    crash_before_write: bool = False  # fault injection for tests: the worker process dies


@dataclass(frozen=True)
class ShardSummary:
    index: int
    images: int
    errors: int
    rows: int
    seconds: float
    certified: dict[str, int] = field(default_factory=dict)  # "<patch_px>px/<method>" -> count
    started_at: float = 0.0  # wall clock (time.time()) when the shard started, and finished
    finished_at: float = 0.0


def part_location(out: str, shard: int) -> str:
    return storage.join(out, "certificates", f"part-{shard:05d}.parquet")


def load_run_model(run: RunConfig, s3: storage.S3Options) -> StagedClassifier:
    """The run's model with its checkpoint loaded (see :func:`load_stored_model`)."""
    return load_stored_model(run.model, run.checkpoint, s3)


def load_stored_model(
    name: str, checkpoint: str | None, s3: storage.S3Options
) -> StagedClassifier:
    """Model ``name`` with ``checkpoint`` loaded (an ``s3://`` checkpoint is downloaded to a
    temporary file first). ``model.checkpoint_sha256`` fingerprints the weights."""
    if checkpoint is None or not storage.is_s3(checkpoint):
        return load_model(name, checkpoint=checkpoint)
    with tempfile.TemporaryDirectory(prefix="scalecert-ckpt-") as folder:
        path = Path(folder) / Path(checkpoint).name
        path.write_bytes(storage.read_bytes(checkpoint, s3))
        return load_model(name, checkpoint=path)


class ShardWorker:
    """Certifies shards with one model held in memory."""

    def __init__(self, settings: WorkerSettings) -> None:
        torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        run = settings.run
        self.s3 = storage.S3Options(endpoint=run.s3_endpoint)
        self.model = load_run_model(run, self.s3)
        self.num_classes = self.model.num_classes
        self.preprocess = Preprocess.for_input_size(settings.image_side)
        self.certifiers = [
            (patch_px, method, Certifier(self.model, run.cert_config(patch_px, method),
                                         device=settings.device,
                                         batch_size=run.g_batch_size(settings.device),
                                         full_map=run.full_map,
                                         fast=run.fast_path(settings.device)))
            for patch_px in settings.patch_pixels
            for method in run.methods
        ]
        self.io_pool = ThreadPoolExecutor(max_workers=max(2, settings.threads),
                                          thread_name_prefix="scalecert-io")

    @property
    def keys(self) -> list[tuple[int, str]]:
        return [(patch_px, method) for patch_px, method, _ in self.certifiers]

    def _decode(self, record: ImageRecord) -> np.ndarray | str:
        """The preprocessed image, or the reason it cannot be certified."""
        if record.label < 0:
            return "no label: the image is not in a class folder or the ground truth"
        if record.label >= self.num_classes:
            return f"label {record.label} is outside the model's {self.num_classes} classes"
        try:
            return decode(storage.read_bytes(record.location, self.s3), self.preprocess)
        except ImageError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read {record.location}: {exc}"

    def decoded_chunks(
        self, records: tuple[ImageRecord, ...]
    ) -> Iterator[list[tuple[ImageRecord, np.ndarray | str]]]:
        """``records`` in chunks of ``chunk_images``, each record with its decoded image or the
        reason it has none. The next chunk is decoding in the I/O threads while the caller works
        on the current one."""
        size = self.settings.chunk_images
        chunks = [records[begin:begin + size] for begin in range(0, len(records), size)]

        def submit(chunk: tuple[ImageRecord, ...]) -> list[Future]:
            return [self.io_pool.submit(self._decode, record) for record in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            decoded = [future.result() for future in pending]
            if index + 1 < len(chunks):
                pending = submit(chunks[index + 1])
            yield list(zip(chunk, decoded))

    def run(self, task: ShardTask) -> ShardSummary:
        """Certify one shard and write its Parquet file; returns counts for the progress line."""
        started_at, start = time.time(), time.perf_counter()
        context = RowContext(run_id=self.settings.run_id, shard=task.index)
        rows: list[dict[str, Any]] = []
        certified = {f"{px}px/{method}": 0 for px, method in self.keys}
        errors = 0
        for chunk in self.decoded_chunks(task.records):
            good: list[tuple[ImageRecord, np.ndarray]] = []
            for record, outcome in chunk:
                if isinstance(outcome, str):
                    rows += error_rows(context, record.image_id, record.label, outcome, self.keys)
                    errors += 1
                else:
                    good.append((record, outcome))
            if good:
                rows += self._certify_chunk(context, good, certified)
        if task.crash_before_write:
            os._exit(17)  # simulate a worker killed mid-shard (tests only)
        data = to_parquet_bytes(rows, self.settings.metadata)
        storage.write_bytes_atomic(part_location(self.settings.run.out, task.index), data, self.s3)
        return ShardSummary(
            index=task.index, images=len(task.records), errors=errors,
            rows=len(rows), seconds=time.perf_counter() - start, certified=certified,
            started_at=started_at, finished_at=time.time(),
        )

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """On CUDA: through pinned memory, copied without blocking the host (the copy is
        ordered before the stem on the same stream). On the CPU: as it is."""
        device = torch.device(self.settings.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return images
        return images.pin_memory().to(device, non_blocking=True)

    def _certify_chunk(
        self,
        context: RowContext,
        chunk: list[tuple[ImageRecord, np.ndarray]],
        certified: dict[str, int],
    ) -> list[dict[str, Any]]:
        ids = [record.image_id for record, _ in chunk]
        labels = [record.label for record, _ in chunk]
        images = self._to_device(to_batch([array for _, array in chunk]))
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        prepared: dict[tuple, Any] = {}  # stem outputs shared by patch sizes and methods
        rows = []
        for patch_px, method, certifier in self.certifiers:
            began = time.perf_counter()
            key = certifier.preparation_key
            if key not in prepared:
                prepared[key] = certifier.prepare(images)
            result = certifier.certify(images, label_tensor, prepared=prepared[key])
            latency = 1000.0 * (time.perf_counter() - began) / len(chunk)
            certified[f"{patch_px}px/{method}"] += int(result.certified.sum())
            rows += certified_rows(context, ids, labels, method, patch_px, result, latency,
                                   with_mask_map=self.settings.run.full_map)
        return rows
