"""The shared driver of the sharded jobs (certify, attack): plan, output, a pool of Ray
actors, retries, read-back and summary. Each job brings a :class:`~pipeline.run.plan.Job`
(its rows, its worker, what it adds to the fingerprint and the manifest) to :func:`run_job`.

0. Preflight (:mod:`pipeline.io.preflight`): the output takes a file, the inputs can be
   read; a local disk short of space is warned about once the plan says how much is written.
   A failure of the environment, then or later, is an ``EnvironmentFault``; once shards have
   run it says how many are kept.
1. Plan and output (:mod:`pipeline.run.plan`): the model checked, the data listed and cut
   into shards, the fingerprint; ``manifest.json`` written or checked; finished shards
   skipped (resume).
2. Run (:func:`execute`): one actor per GPU (or CPU workers splitting the cores, ``workers x
   threads`` at most the cores), each loading the model once, at most two shards in flight
   per worker. A worker that dies has its shards redone on its restarted actor (Ray places
   it wherever resources allow).
3. Summary (:func:`collect`): read back every shard, check one row per image x patch x
   method, and count.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from pipeline.compute.cluster import cluster_resources, init_ray, worker_layout
from pipeline.io import preflight, storage
from pipeline.io.certificates import read_parts
from pipeline.io.faults import environment_fault
from pipeline.run.config import RunConfig
from pipeline.run.plan import Job, Plan, make_plan, prepare_output
from pipeline.run.worker import ShardSummary
from scalecert.errors import EnvironmentFault, Refusal, RunFailed


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
    worker: tuple[type, tuple] | None = None,
) -> None:
    """Run the shards in ``todo`` on a pool of Ray actors (Ray must be initialised); a shard
    whose worker dies is retried, up to ``max_attempts`` tries in all. ``worker``: the actor
    class and its arguments after the settings (default: the plan's job's; tests pass doubles
    here, such as a worker that dies mid-shard)."""
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
    settings = plan.worker_settings(layout.device, layout.threads)
    worker_class, worker_args = plan.job.worker(plan) if worker is None else worker
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
                # The environment failing (a full disk, S3 gone or denying, retries used up) or a
                # refusal (the checkpoint changed since the plan): no retry now can make the
                # shard right, so the run stops with the worker's message; anything else is a
                # bug and keeps its traceback.
                fault = environment_fault(exc)
                if fault is not None:
                    raise fault from None
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


def run_job(
    run: RunConfig, job: Job, progress: Callable[[ShardSummary], None] | None = None,
    on_plan: Callable[[Plan, list[int]], None] | None = None,
) -> RunSummary:
    """Check the locations (:mod:`pipeline.io.preflight`), plan, check the output, run the
    missing shards on Ray and summarise: every sharded job's run (``scalecert certify``:
    :func:`pipeline.certify.driver.run_certification`; ``scalecert attack``:
    :func:`pipeline.attack.driver.run_attack`). The job's worker is made from the plan before
    any shard runs."""
    import ray

    started = time.perf_counter()
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    # before the plan: it reads the checkpoint and lists the data, and writes the manifest
    preflight.check_locations(run.out, (*run.reads(), *job.reads), s3)
    plan = make_plan(run, job)
    todo = prepare_output(plan)
    warning = preflight.space_warning(run.out, plan.expected_bytes(todo))
    if warning is not None:
        print(warning, file=sys.stderr)
    if on_plan is not None:
        on_plan(plan, todo)
    written = len(plan.shards) - len(todo)

    def shard_done(summary: ShardSummary) -> None:
        nonlocal written
        written += 1
        if progress is not None:
            progress(summary)

    try:
        if todo:
            actors = job.worker(plan)
            owned = init_ray(run.address)
            try:
                execute(plan, todo, shard_done, worker=actors)
            finally:
                if owned:
                    ray.shutdown()
        table = collect(plan)
    except EnvironmentFault as fault:
        raise EnvironmentFault(
            fault.location, fault.problem,
            f"the run stopped with {written} of {len(plan.shards)} shards written and kept in "
            f"{run.out}; rerun the same command to resume") from fault
    errors = sum(1 for status in table.column("status").to_pylist() if status == "error")
    per_image = len(plan.patch_pixels) * len(run.methods)
    return RunSummary(
        images=len(plan.records), errors=errors // per_image, shards=len(plan.shards),
        shards_skipped=len(plan.shards) - len(todo),
        images_run=sum(plan.shards[i][1] - plan.shards[i][0] for i in todo),
        wall_s=time.perf_counter() - started,
        table=table,
    )
