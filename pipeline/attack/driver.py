"""``scalecert attack``: the shared run (:func:`pipeline.run.driver.run_job`: plan, resume,
actor pool, read-back) with the attack worker; its rows are attack rows in ``<out>/attacks/``,
and its options enter the fingerprint and the manifest.

Before the shards run, ``--attack universal`` trains one patch per (patch size, method) on
``--universal-data`` in the driver (the paper's Eq. 3) and keeps it in
``<out>/universal/<px>px-<method>.json``, so a resumed run attacks with the same patch. The
rows it returns are audited by the attack report (:mod:`pipeline.report.attacks`): a certified
image whose attacked version ends in neither its label nor ALERT is a soundness violation.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from pipeline.compute.batches import load_spread
from pipeline.compute.models import load_stored_model
from pipeline.io import storage
from pipeline.io.images import Preprocess
from pipeline.attack.config import AttackOptions, AttackRun
from pipeline.attack.worker import AttackSettings, AttackWorker, universal_key
from pipeline.io.attack_rows import ATTACK_ROWS
from pipeline.run.driver import RunSummary, run_job
from pipeline.run.plan import Job, Plan
from pipeline.run.worker import ShardSummary
from scalecert.attack_registry import attack_info
from scalecert.attacks import train_universal_patch
from scalecert.errors import InvalidOption


def universal_location(out: str, patch_px: int, method: str) -> str:
    return storage.join(out, "universal", f"{patch_px}px-{method}.json")


def universal_patches(plan: Plan, options: AttackOptions,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The universal patch of every (patch size, method): read back when this run already
    trained it (same fingerprint), else trained on ``--universal-data`` and written."""
    if not attack_info(options.attack).trains_patch:
        return {}
    run = plan.run
    s3 = storage.S3Options(endpoint=run.s3_endpoint)
    patches: dict[str, Any] = {}
    missing = []
    for patch_px in plan.patch_pixels:
        for method in run.methods:
            location = universal_location(run.out, patch_px, method)
            if storage.exists(location, s3):
                stored = json.loads(storage.read_bytes(location, s3))
                if stored.get("fingerprint") == plan.fingerprint:
                    patches[universal_key(patch_px, method)] = stored["patch"]
                    continue
            missing.append((patch_px, method))
    if not missing:
        return patches
    model = load_stored_model(run.model, run.checkpoint, s3, expect_sha256=plan.checkpoint_sha256,
                              preprocessing=plan.preprocessing or run.preprocessing(),
                              expect_source_sha256=plan.source_sha256,
                              expect_package_versions=plan.package_versions)
    images, labels = load_spread(options.universal_data, options.universal_images,
                                 model.num_classes, Preprocess.of(model.preprocessing), s3,
                                 "universal-data")
    for patch_px, method in missing:
        began = time.perf_counter()
        patch = train_universal_patch(
            model, run.cert_config(patch_px, method), images, labels,
            options.attack_config(patch_px), attack_model=options.attack_model,
            epochs=options.universal_epochs)
        values = patch.detach().cpu().tolist()
        storage.write_text_atomic(
            universal_location(run.out, patch_px, method),
            json.dumps({"fingerprint": plan.fingerprint, "patch_px": patch_px,
                        "method": method, "images": len(labels), "patch": values}) + "\n", s3)
        patches[universal_key(patch_px, method)] = values
        log(f"universal patch {patch_px} px / {method}: trained on {len(labels)} images in "
            f"{time.perf_counter() - began:.1f} s")
    return patches


def run_attack(
    attack_run: AttackRun,
    progress: Callable[[ShardSummary], None] | None = None,
    on_plan: Callable[[Plan, list[int]], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> RunSummary:
    """The shared run with the attack worker; a universal patch is trained (or read back)
    before any shard. The rows it returns are audited by the caller
    (:mod:`pipeline.report.attacks`)."""
    options = attack_run.options

    def worker(plan: Plan) -> tuple[type, tuple]:
        target = options.target
        if target is not None and target >= plan.num_classes:
            raise InvalidOption(f"--target: class {target} is not among the model's "
                                f"{plan.num_classes} classes (0 to {plan.num_classes - 1})")
        return AttackWorker, (AttackSettings(options, universal_patches(plan, options, log)),)

    job = Job(rows=ATTACK_ROWS, worker=worker,
              fingerprint={"attack": options.fingerprint_fields()},
              manifest={"job": "attack", "attack": options.to_dict()},
              reads=(("--universal-data", options.universal_data),))
    return run_job(attack_run.run, job, progress, on_plan)
