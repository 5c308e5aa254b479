"""The Ray driver: plan, manifest, a pool of shard workers, resume, retries, summary.

1. Plan: load the model once (refusing a bad spec, checkpoint or layer before any image is
   read), list the dataset (sorted keys), apply ``--limit``, cut shards of ``--shard-size``.
   The fingerprint hashes the result-relevant options (the model spec and the declared
   preprocessing among them), the checkpoint's sha256, the model file's or program's sha256,
   the versions of the packages the spec imports, the resolved preprocessing of a user
   model, the dataset's keys and labels, and the package version; ``<out>/manifest.json`` is
   written first.
2. Resume: a shard whose Parquet file exists with the same fingerprint is skipped; an output
   folder holding another fingerprint is refused before any work.
3. Run: one actor per GPU (or CPU workers splitting the cores, ``workers x threads`` at most
   the cores), each loading the model once, at most two shards in flight per worker. A worker that dies has its shards redone on its
   restarted actor (Ray places it wherever resources allow).
4. Summary: read back every shard, check one row per image x patch x method, and count.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from pipeline.compute.cluster import cluster_resources, init_ray, worker_layout
from pipeline.compute.models import as_flag_message, load_stored_model, model_fingerprint_fields
from pipeline.io import storage
from pipeline.io.attack_rows import attack_part_location
from pipeline.io.certificates import part_location, read_metadata, read_parts
from pipeline.io.sources import Dataset, ImageRecord, listing_sha256, open_dataset
from pipeline.run.attack_config import AttackOptions
from pipeline.run.config import RunConfig
from pipeline.run.worker import ShardSummary, ShardTask, ShardWorker, WorkerSettings
from scalecert import __version__
from scalecert.errors import InvalidOption, OutputConflict, Refusal, RunFailed
from scalecert.methods.registry import method_info
from scalecert.models import Preprocessing


class RunRefused(OutputConflict):
    """The output folder holds results that this run must not mix with."""


@dataclass(frozen=True)
class Plan:
    run: RunConfig
    dataset: Dataset
    records: tuple[ImageRecord, ...]
    shards: tuple[tuple[int, int], ...]  # (start, stop) into records
    image_side: int
    patch_pixels: tuple[int, ...]
    checkpoint_sha256: str | None
    fingerprint: str
    attack: AttackOptions | None = None  # an attack run (`scalecert attack`), else certify
    num_classes: int | None = None  # the model's
    preprocessing: Preprocessing | None = None  # resolved: how workers decode the images
    source_sha256: str | None = None  # of the model's file or program (workers check it)
    package_versions: dict[str, str | None] | None = None  # of the packages the spec imports

    @property
    def run_id(self) -> str:
        return self.fingerprint[:16]

    def part_location(self, index: int) -> str:
        """Where shard ``index`` keeps its rows: certificates/ or, for an attack run, attacks/."""
        if self.attack is not None:
            return attack_part_location(self.run.out, index)
        return part_location(self.run.out, index)

    def task(self, index: int) -> ShardTask:
        start, stop = self.shards[index]
        return ShardTask(index=index, records=self.records[start:stop])

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
        if self.attack is not None:
            metadata.update(job="attack", attack=self.attack.to_dict())
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


def make_plan(run: RunConfig, attack: AttackOptions | None = None) -> Plan:
    """List the data and fix everything the workers need, without starting Ray; ``attack``:
    the options of an attack run (they enter its fingerprint)."""
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
    if attack is not None:
        fields["attack"] = attack.fingerprint_fields()
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return Plan(run, dataset, records, shards, image_side, patch_pixels, checkpoint_sha,
                fingerprint, attack, model.num_classes, model.preprocessing,
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


@dataclass(frozen=True)
class RunSummary:
    images: int  # listed images, all with certificate rows
    errors: int  # images whose rows have status "error"
    shards: int
    shards_skipped: int  # done by an earlier run (resume)
    images_run: int  # images certified by this run
    wall_s: float
    table: pa.Table

    @property
    def images_per_s(self) -> float:
        """Throughput of this run (resumed shards excluded)."""
        return self.images_run / self.wall_s if self.wall_s > 0 else float("nan")

    def certified_accuracy(self) -> dict[tuple[int, str], float]:
        """Per (patch_px, method): certified images / all listed images (errors count)."""
        patch = self.table.column("patch_px").to_pylist()
        method = self.table.column("method").to_pylist()
        certified = self.table.column("certified").to_pylist()
        totals: dict[tuple[int, str], list[int]] = {}
        for key in zip(patch, method, certified):
            counts = totals.setdefault(key[:2], [0, 0])
            counts[0] += bool(key[2])
            counts[1] += 1
        return {key: hits / total for key, (hits, total) in sorted(totals.items())}


def collect(plan: Plan) -> pa.Table:
    """All certificate rows of the run; checks one row per image x patch x method."""
    s3 = storage.S3Options(endpoint=plan.run.s3_endpoint)
    locations = [plan.part_location(index) for index in range(len(plan.shards))]
    tables = []
    for at, part in zip(locations, read_parts(locations, s3)):
        if part is None:
            raise RunFailed(f"{at}: no such file after the run")
        tables.append(part)
    table = pa.concat_tables(tables) if tables else pa.table({})
    expected = len(plan.records) * len(plan.patch_pixels) * len(plan.run.methods)
    if table.num_rows != expected:
        raise RunFailed(f"{plan.run.out}: {table.num_rows} certificate rows, expected {expected}")
    return table


def execute(
    plan: Plan,
    todo: list[int],
    on_shard: Callable[[ShardSummary], None] | None = None,
    max_attempts: int = 3,
    worker: tuple[type, tuple] = (ShardWorker, ()),
) -> None:
    """Run the shards in ``todo`` on a pool of Ray actors (Ray must be initialised); a shard
    whose worker dies is retried, up to ``max_attempts`` tries in all. ``worker``: the actor
    class and its arguments after the settings (the certify worker by default; tests pass
    doubles here, such as a worker that dies mid-shard)."""
    import ray
    from ray.exceptions import (
        ActorUnavailableError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )

    if not todo:
        return
    run = plan.run
    layout = worker_layout(run.device, cluster_resources(run.device, run.address), run.workers,
                           limit=len(todo), gpus_per_worker=run.gpus_per_worker)
    workers = layout.workers
    settings = WorkerSettings(
        run=run, run_id=plan.run_id, metadata=plan.metadata(), patch_pixels=plan.patch_pixels,
        image_side=plan.image_side, checkpoint_sha256=plan.checkpoint_sha256,
        device=layout.device, threads=layout.threads, preprocessing=plan.preprocessing,
        source_sha256=plan.source_sha256, package_versions=plan.package_versions,
    )
    worker_class, worker_args = worker
    actor_class = ray.remote(worker_class).options(
        num_cpus=layout.cpus, num_gpus=layout.gpus, max_restarts=-1, max_task_retries=0)
    actors = [actor_class.remote(settings, *worker_args) for _ in range(workers)]
    attempts: dict[int, int] = {}
    queue = list(todo)
    in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
    unavailable_since: dict[int, float] = {}  # actor -> when it was first found restarting

    def submit(actor: int) -> None:
        shard = queue.pop(0)
        attempts[shard] = attempts.get(shard, 0) + 1
        in_flight[actors[actor].run.remote(plan.task(shard))] = (shard, actor)

    def lost_attempt(shard: int, exc: Exception) -> None:
        """A try of ``shard`` died with its worker: retried unless it was the last."""
        if attempts[shard] >= max_attempts:
            raise RunFailed(f"shard {shard} failed {attempts[shard]} times: {exc}") from exc
        print(f"worker lost on shard {shard} (attempt {attempts[shard]}); retrying",
              file=sys.stderr)

    try:
        for actor in range(workers):
            for _ in range(2):
                if queue:
                    submit(actor)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            shard, actor = in_flight.pop(done[0])
            try:
                summary = ray.get(done[0])
            except ActorUnavailableError as exc:
                # The worker is restarting after a crash. The first call to report it was running
                # when it died: a lost attempt. Calls that merely found it restarting are not
                # attempts; they wait for it (at most 300 s).
                first = actor not in unavailable_since
                since = unavailable_since.setdefault(actor, time.monotonic())
                if first:
                    lost_attempt(shard, exc)
                elif time.monotonic() - since > 300:
                    raise RunFailed(f"shard {shard}: worker {actor} unavailable for 300 s: "
                                    f"{exc}") from exc
                else:
                    attempts[shard] -= 1
                    time.sleep(0.5)
                queue.insert(0, shard)
            except (RayActorError, WorkerCrashedError) as exc:
                unavailable_since.setdefault(actor, time.monotonic())  # it restarts from here on
                lost_attempt(shard, exc)
                queue.insert(0, shard)
            except RayTaskError as exc:
                # A refusal (the checkpoint changed since the plan): no retry can make the shard
                # right, so the run stops with the worker's message; anything else is a bug and
                # keeps its traceback.
                if isinstance(exc.cause, Refusal):
                    raise exc.cause from None
                raise
            else:
                unavailable_since.pop(actor, None)
                if on_shard is not None:
                    on_shard(summary)
            if queue:
                submit(actor)
    except BaseException:
        # a stopped run leaves no worker behind holding CPUs or GPUs in a shared Ray
        for handle in actors:
            ray.kill(handle)
        raise


def run_certification(
    run: RunConfig, progress: Callable[[ShardSummary], None] | None = None,
    on_plan: Callable[[Plan, list[int]], None] | None = None,
    attack: AttackOptions | None = None,
    worker: Callable[[Plan], tuple[type, tuple]] | None = None,
) -> RunSummary:
    """Plan, check the output, run the missing shards on Ray and summarise. ``attack`` and
    ``worker`` (the actor class and its extra arguments, made from the plan before any shard
    runs): another job on the same plan (``scalecert attack``); default: certify."""
    import ray

    started = time.perf_counter()
    plan = make_plan(run, attack)
    todo = prepare_output(plan)
    if on_plan is not None:
        on_plan(plan, todo)
    if todo:
        actors = (ShardWorker, ()) if worker is None else worker(plan)
        owned = init_ray(run.address)
        try:
            execute(plan, todo, progress, worker=actors)
        finally:
            if owned:
                ray.shutdown()
    table = collect(plan)
    errors = sum(1 for status in table.column("status").to_pylist() if status == "error")
    per_image = len(plan.patch_pixels) * len(run.methods)
    return RunSummary(
        images=len(plan.records), errors=errors // per_image, shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(todo),
        images_run=sum(plan.shards[i][1] - plan.shards[i][0] for i in todo),
        wall_s=time.perf_counter() - started,
        table=table,
    )
