"""The shard worker every sharded job (certify, attack) builds on: loads the model once, runs
whole shards, writes one Parquet file each.

``ShardWorker`` is a plain class (Ray's batch-inference pattern: the model is loaded in
``__init__``); the driver wraps it in a Ray actor. For one shard it reads and decodes the images
in I/O threads, a chunk ahead of the job's chunk step, runs that step chunk by chunk — the
certifiers of every (patch size, method) share each chunk's decode and stem — and writes the
shard's rows as ``part-<shard>.parquet`` atomically, so a shard is either completely written or
absent. A job's worker (``pipeline.certify.worker``, ``pipeline.attack.worker``) says how its
rows are kept and gives the rows of a chunk and of an image that could not be read.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.compute.batches import to_batch
from pipeline.compute.cluster import ray_node_id, set_torch_threads
from pipeline.compute.models import load_stored_model
from pipeline.io import storage
from pipeline.io.certificates import PartFiles, RowContext
from pipeline.io.images import Preprocess, read_labelled
from pipeline.io.sources import ImageRecord
from pipeline.run.config import RunConfig
from scalecert.certify import CertifierGroup
from scalecert.errors import Refusal
from scalecert.models import Preprocessing


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, picklable for Ray."""

    run: RunConfig
    run_id: str
    metadata: dict[str, Any]  # goes into every Parquet file's schema metadata (with written_by)
    patch_pixels: tuple[int, ...]
    image_side: int
    checkpoint_sha256: str | None  # the plan's: a worker refuses a checkpoint with other bytes
    device: str = "cpu"
    threads: int = 1
    chunk_images: int = 256
    preprocessing: Preprocessing | None = None  # the plan's, resolved (None: the model's own)
    source_sha256: str | None = None  # the plan's model file or program: other bytes refused
    package_versions: dict[str, str | None] | None = None  # the plan's: others refused


@dataclass(frozen=True)
class ShardTask:
    index: int
    records: tuple[ImageRecord, ...]


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


class ShardWorker:
    """Runs shards with one model held in memory; a job's worker sets :attr:`rows` and gives
    :meth:`_chunk_rows` and :meth:`_error_rows`.

    A refusal while loading the model (the checkpoint changed since the plan, or vanished) is
    kept and raised by :meth:`run`: an exception in ``__init__`` reaches the Ray driver only
    as text, while one raised by a task reaches it as itself, and the driver stops the run on
    it instead of retrying (no retry can make those shards right)."""

    rows: PartFiles  # the job's part files: folder, schema, sort order

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.refusal: Refusal | None = None
        try:
            self._load(settings)
        except Refusal as exc:
            self.refusal = exc

    def _load(self, settings: WorkerSettings) -> None:
        set_torch_threads(settings.threads)
        run = settings.run
        self.s3 = storage.S3Options(endpoint=run.s3_endpoint)
        self.model = load_stored_model(
            run.model, run.checkpoint, self.s3, expect_sha256=settings.checkpoint_sha256,
            preprocessing=settings.preprocessing or run.preprocessing(),
            expect_source_sha256=settings.source_sha256,
            expect_package_versions=settings.package_versions)
        self.num_classes = self.model.num_classes
        self.preprocess = Preprocess.of(self.model.preprocessing)
        self.keys = [(patch_px, method) for patch_px in settings.patch_pixels
                     for method in run.methods]
        self.certifiers = CertifierGroup(
            self.model, [run.cert_config(patch_px, method) for patch_px, method in self.keys],
            device=settings.device, batch_size=run.g_batch_size(settings.device),
            full_map=run.full_map, fast=run.fast_path(settings.device))
        self.io_pool = ThreadPoolExecutor(max_workers=max(2, settings.threads),
                                          thread_name_prefix="scalecert-io")
        # provenance of every file this worker writes: which host and Ray node certified it
        self.written_by = {"host": socket.gethostname(), "ray_node_id": ray_node_id()}

    def _read(self, record: ImageRecord) -> np.ndarray | str:
        """The preprocessed image, or the reason it cannot be certified."""
        outcome = read_labelled(record, self.preprocess, self.num_classes, self.s3)
        return outcome.pixels if outcome.pixels is not None else str(outcome.reason)

    def decoded_chunks(
        self, records: tuple[ImageRecord, ...]
    ) -> Iterator[list[tuple[ImageRecord, np.ndarray | str]]]:
        """``records`` in chunks of ``chunk_images``, each record with its decoded image or the
        reason it has none. The next chunk is decoding in the I/O threads while the caller works
        on the current one."""
        size = self.settings.chunk_images
        chunks = [records[begin:begin + size] for begin in range(0, len(records), size)]

        def submit(chunk: tuple[ImageRecord, ...]) -> list[Future]:
            return [self.io_pool.submit(self._read, record) for record in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            decoded = [future.result() for future in pending]
            if index + 1 < len(chunks):
                pending = submit(chunks[index + 1])
            yield list(zip(chunk, decoded))

    def run(self, task: ShardTask) -> ShardSummary:
        """Run one shard and write its Parquet file; returns counts for the progress line."""
        if self.refusal is not None:
            raise self.refusal
        started_at, start = time.time(), time.perf_counter()
        context = RowContext(run_id=self.settings.run_id, shard=task.index)
        blocks: list[pa.Table] = []
        certified = {f"{px}px/{method}": 0 for px, method in self.keys}
        errors = 0
        for chunk in self.decoded_chunks(task.records):
            good: list[tuple[ImageRecord, np.ndarray]] = []
            for record, outcome in chunk:
                if isinstance(outcome, str):
                    blocks.append(self._error_rows(context, record, outcome))
                    errors += 1
                else:
                    good.append((record, outcome))
            if good:
                blocks += self._chunk_rows(context, good, certified)
        self._write(task.index, blocks)
        return ShardSummary(
            index=task.index, images=len(task.records), errors=errors,
            rows=sum(block.num_rows for block in blocks), seconds=time.perf_counter() - start,
            certified=certified, started_at=started_at, finished_at=time.time(),
        )

    def _write(self, shard: int, blocks: list[pa.Table]) -> None:
        """The shard's rows as its Parquet file (with the run's metadata and who wrote it),
        written atomically."""
        data = self.rows.parquet_bytes(blocks, {**self.settings.metadata,
                                                "written_by": self.written_by})
        storage.write_bytes_atomic(self.rows.location(self.settings.run.out, shard), data,
                                   self.s3)

    # -- what each job's worker gives ----------------------------------------------------

    def _chunk_rows(
        self,
        context: RowContext,
        chunk: list[tuple[ImageRecord, np.ndarray]],
        certified: dict[str, int],
    ) -> list[pa.Table]:
        """The rows of a chunk of decoded images; adds its certificates to ``certified``
        (per ``<patch_px>px/<method>``, for the progress line)."""
        raise NotImplementedError

    def _error_rows(self, context: RowContext, record: ImageRecord, reason: str) -> pa.Table:
        """The rows of an image that could not be read (``reason``)."""
        raise NotImplementedError

    # -- helpers of the chunk steps ------------------------------------------------------

    def _batch(
        self, chunk: list[tuple[ImageRecord, np.ndarray]]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """A chunk's image ids, labels and images (on the worker's device)."""
        ids = [record.image_id for record, _ in chunk]
        labels = torch.tensor([record.label for record, _ in chunk], dtype=torch.int64)
        return ids, labels, self._to_device(to_batch([array for _, array in chunk]))

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """On CUDA: through pinned memory, copied without blocking the host (the copy is
        ordered before the stem on the same stream). On the CPU: as it is."""
        device = torch.device(self.settings.device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return images
        return images.pin_memory().to(device, non_blocking=True)
