"""``scalecert certify``: the shared run (:func:`pipeline.run.driver.run_job`) with the certify
worker; its rows are the certificates, and it adds nothing to the fingerprint or the manifest."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from pipeline.certify.worker import CertifyWorker
from pipeline.io.certificates import CERTIFICATES
from pipeline.run.config import RunConfig
from pipeline.run.driver import RunSummary, run_job
from pipeline.run.plan import Job, Plan
from pipeline.run.worker import ShardSummary

CERTIFY = Job(rows=CERTIFICATES, worker=lambda plan: (CertifyWorker, ()))


def run_certification(
    run: RunConfig, progress: Callable[[ShardSummary], None] | None = None,
    on_plan: Callable[[Plan, list[int]], None] | None = None,
    worker: Callable[[Plan], tuple[type, tuple]] | None = None,
) -> RunSummary:
    """Plan, check the output, certify the missing shards on Ray and summarise. ``worker``:
    another actor class and its arguments, made from the plan (tests pass doubles here)."""
    job = CERTIFY if worker is None else replace(CERTIFY, worker=worker)
    return run_job(run, job, progress, on_plan)
