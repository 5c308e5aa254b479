"""A sharded job's plan and its output folder: what every job (certify, attack) shares before
any shard runs.

1. Plan (:func:`make_plan`): load the model once (refusing a bad spec, checkpoint or layer
   before any image is read), list the dataset (sorted keys), apply ``--limit``, cut shards of
   ``--shard-size``. The fingerprint hashes the result-relevant options (the model spec and
   the declared preprocessing among them), the checkpoint's sha256, the model file's or
   program's sha256, the versions of the packages the spec imports, the resolved
   preprocessing of a user model, the dataset's keys and labels, the package version, and
   what the job adds (:class:`Job`).
2. Output (:func:`prepare_output`): ``<out>/manifest.json`` is written first; a shard whose
   part file exists with the same fingerprint is skipped (resume); an output folder holding
   another fingerprint is refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.compute.models import as_flag_message, load_stored_model, model_fingerprint_fields
from pipeline.io import preflight, storage
from pipeline.io.certificates import PartFiles, read_metadata
from pipeline.io.sources import Dataset, ImageRecord, listing_sha256, open_dataset
from pipeline.run.config import RunConfig
from pipeline.run.worker import ShardTask, WorkerSettings
from scalecert import __version__
from scalecert.errors import InvalidOption, OutputConflict
from scalecert.methods.registry import method_info
from scalecert.models import Preprocessing


class RunRefused(OutputConflict):
    """The output folder holds results that this run must not mix with."""


@dataclass(frozen=True)
class Job:
    """What one sharded job brings to the shared run (plan, output, actor pool, read-back).

    rows: where and how its rows are kept (one Parquet file per shard). worker: made from the
    plan before any shard runs, the actor class and its arguments after the settings.
    fingerprint, manifest: what it adds to the run's fingerprint, and to ``manifest.json`` and
    every part file's metadata (certify adds nothing). reads: the locations it reads beyond
    the run's (:meth:`RunConfig.reads`), as ``(flag, location)``, for the preflight."""

    rows: PartFiles
    worker: Callable[[Plan], tuple[type, tuple]]
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    manifest: Mapping[str, Any] = field(default_factory=dict)
    reads: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Plan:
    run: RunConfig
    job: Job
    dataset: Dataset
    records: tuple[ImageRecord, ...]
    shards: tuple[tuple[int, int], ...]  # (start, stop) into records
    image_side: int
    patch_pixels: tuple[int, ...]
    checkpoint_sha256: str | None
    fingerprint: str
    num_classes: int | None = None  # the model's
    preprocessing: Preprocessing | None = None  # resolved: how workers decode the images
    source_sha256: str | None = None  # of the model's file or program (workers check it)
    package_versions: dict[str, str | None] | None = None  # of the packages the spec imports

    @property
    def run_id(self) -> str:
        return self.fingerprint[:16]

    def part_location(self, index: int) -> str:
        """Where shard ``index`` keeps its rows (the job's folder: certificates/, attacks/)."""
        return self.job.rows.location(self.run.out, index)

    def task(self, index: int) -> ShardTask:
        start, stop = self.shards[index]
        return ShardTask(index=index, records=self.records[start:stop])

    def worker_settings(self, device: str = "cpu", threads: int = 1) -> WorkerSettings:
        """What every worker of this plan is given."""
        return WorkerSettings(
            run=self.run, run_id=self.run_id, metadata=self.metadata(),
            patch_pixels=self.patch_pixels, image_side=self.image_side,
            checkpoint_sha256=self.checkpoint_sha256, device=device, threads=threads,
            preprocessing=self.preprocessing, source_sha256=self.source_sha256,
            package_versions=self.package_versions)

    def expected_bytes(self, todo: list[int]) -> int:
        """About how many bytes the shards in ``todo`` will write (for the free-space
        warning): each part file's schema and metadata, and its rows (with their full maps)."""
        overhead = len(self.job.rows.parquet_bytes([], {**self.metadata(), "written_by": {}}))
        masks = self.run.masks_per_axis ** 2
        per_row = 0
        if self.run.full_map:  # one-mask maps; recovery methods keep every pair too
            recovery = any(method_info(m).guarantee == "recovery" for m in self.run.methods)
            per_row = masks + (masks * (masks - 1) // 2 if recovery else 0)
        rows_per_image = len(self.patch_pixels) * len(self.run.methods)
        return sum(
            preflight.shard_bytes((self.shards[i][1] - self.shards[i][0]) * rows_per_image,
                                  len(self.job.rows.schema), per_row, overhead)
            for i in todo)

    def metadata(self) -> dict[str, Any]:
        metadata = {"run_id": self.run_id, "fingerprint": self.fingerprint,
                    "version": __version__, "config": self.run.to_dict(),
                    "checkpoint_sha256": self.checkpoint_sha256,
                    "patch_px": list(self.patch_pixels)}
        if self.source_sha256 is not None:
            metadata["source_sha256"] = self.source_sha256
        if self.package_versions:
            metadata["package_versions"] = dict(self.package_versions)
        if self.preprocessing is not None:
            metadata["preprocessing"] = self.preprocessing.declared()
        metadata.update(self.job.manifest)
        return metadata

    def manifest(self) -> dict[str, Any]:
        return {
            **self.metadata(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dataset": {"source": self.dataset.root, "layout": self.dataset.layout,
                        "classes": len(self.dataset.classes),
                        "class_names": list(self.dataset.classes), "listed": len(self.dataset),
                        "images": len(self.records)},
            "image_side": self.image_side,
            "shards": [
                {"index": i, "images": stop - start, "first": self.records[start].image_id,
                 "last": self.records[stop - 1].image_id}
                for i, (start, stop) in enumerate(self.shards)
            ],
        }


def make_plan(run: RunConfig, job: Job) -> Plan:
    """List the data and fix everything the workers need, without starting Ray; ``job``: the
    job the plan is for (what it adds enters the fingerprint)."""
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    try:  # the model is checked here, before any shard: a bad spec or checkpoint fails fast
        model = load_stored_model(run.model, run.checkpoint, s3,
                                  preprocessing=run.preprocessing())
        if any(method_info(method).pruned for method in run.methods):
            model.split(run.layer)  # an unknown layer or a cut the model refuses
    except FileNotFoundError as exc:
        raise InvalidOption(as_flag_message(exc, "--checkpoint")) from None
    except InvalidOption as exc:
        raise InvalidOption(as_flag_message(exc)) from exc
    image_side = model.input_size
    patch_pixels = run.patch_pixels(image_side)
    if len(set(patch_pixels)) != len(patch_pixels):
        raise InvalidOption(f"--patch: {', '.join(run.patches)} give {patch_pixels} px on "
                         f"{image_side} px images: some sizes coincide")
    for px in patch_pixels:
        if px > image_side:
            raise InvalidOption(f"--patch: {px} px is larger than the {image_side} px images")
    checkpoint_sha = model.checkpoint_sha256
    dataset = open_dataset(run.data, s3=s3, ground_truth=run.ground_truth, synsets=run.synsets)
    records = dataset.records[:run.limit]
    shards = tuple(
        (start, min(start + run.shard_size, len(records)))
        for start in range(0, len(records), run.shard_size)
    )
    listing = listing_sha256(records)
    fields = {"config": run.fingerprint_fields(), "checkpoint_sha256": checkpoint_sha,
              "dataset": listing, "version": __version__, "patch_px": list(patch_pixels),
              **model_fingerprint_fields(run.model, model)}
    fields.update(job.fingerprint)
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return Plan(run, job, dataset, records, shards, image_side, patch_pixels, checkpoint_sha,
                fingerprint, model.num_classes, model.preprocessing,
                model.source_sha256, dict(model.package_versions))


def prepare_output(plan: Plan) -> list[int]:
    """Write or check ``manifest.json``; the indices of the shards still to run."""
    run = plan.run
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    manifest_at = storage.join(run.out, "manifest.json")
    if storage.exists(manifest_at, s3):
        existing = json.loads(storage.read_bytes(manifest_at, s3))
        if existing.get("fingerprint") != plan.fingerprint:
            raise RunRefused(
                f"{run.out} already holds run {existing.get('run_id')} with a different "
                f"configuration, model or data (fingerprint {str(existing.get('fingerprint'))[:16]}"
                f" != {plan.fingerprint[:16]}); use a new --out, or remove the old results"
            )
    else:
        storage.write_text_atomic(manifest_at, json.dumps(plan.manifest(), indent=2) + "\n", s3)
    if not run.resume:
        return list(range(len(plan.shards)))

    def done(index: int) -> bool:
        location = plan.part_location(index)
        return (storage.exists(location, s3)
                and read_metadata(location, s3).get("fingerprint") == plan.fingerprint)

    with ThreadPoolExecutor(max_workers=16) as pool:  # S3: round trips per shard, in parallel
        finished = list(pool.map(done, range(len(plan.shards))))
    return [index for index, is_done in enumerate(finished) if not is_done]
