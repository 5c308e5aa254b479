"""The report document: a run's figures as one dict, written out as report.json.

The figures come from :mod:`pipeline.report.reduce` (definitions there); published numbers from
:mod:`pipeline.report.published`, always in their own rows labelled "published". The HTML is one
self-contained file: tables, and plots drawn here as inline SVG (no scripts, no network):
certified accuracy vs patch size (``svg#plot-certified``), masks evaluated per image
(``svg.masks-histogram``), and the images that alert on their clean input with their alert
boxes (``svg.alert-thumb``, thumbnails embedded as base64 PNG).

report.json (``schema = "scalecert-report/1"``; keys are stable, new ones may be added):

- ``schema``, ``generated`` (UTC ISO time)
- ``run``: location, run_id, fingerprint, model, checkpoint_sha256, version, created,
  image_side, config (the manifest's), dataset {source, name, layout, classes, images}
- ``completeness``: complete, shards_listed, shards_present, missing_shards [{index, images,
  first, last}], images_listed, images_with_rows, images_missing
- ``errors``: images (count), items [{image_id, label, error}]
- ``definitions``: metric name -> what it counts, over what
- ``groups``: one per (method, patch_px): method, guarantee (detection or recovery), patch_px,
  patch_area_percent, images, ok_images, error_images, missing_images; vanilla_accuracy,
  pruned_accuracy, clean_accuracy, certified_accuracy, false_alert_rate (None for recovery)
  as {value, successes, n, ci95: [lo, hi]} (fractions);
  masks {per_image, evaluated_mean, evaluated_p50, evaluated_p95, histogram [[n_evaluated,
  images]]}; latency_ms {mean, p50, p95}; images_per_s; worst_classes [{label, name,
  certified_accuracy}]; confidence_curve (detection methods, else None): exact,
  run_alert_confidence, false_alert_target, at_target (a point or None), points [{tau,
  certified_accuracy, clean_accuracy, false_alert_rate}]
- ``published``: rows comparable with the run (same image side and class count): source,
  title, url, where, defense, model, dataset, image_side, patch_area_percent, patch_px,
  clean_accuracy, certified_accuracy (percent, as published), kind, note, published (true)
- ``clean_alerts``: total, items (up to 1000) [{image_id, method, patch_px, label,
  prediction, alert_box [top, left, bottom, right] or null}]
- ``diff``: null, or the audit diff against ``--against`` (see :func:`pipeline.report.reduce.diff_runs`):
  against, against_run_id, against_fingerprint, max_drop_pp, interval, failed,
  groups [{method, patch_px, <each accuracy>: {new, old, delta, ci95, lost, gained},
  certified_drop_pp, failed, lost_certification, gained_certification}],
  groups_only_in_run, groups_only_in_against
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

from pipeline.io.sources import dataset_name
from pipeline.report.published import PublishedRow, relevant
from pipeline.report.reduce import RunData, clean_alerts, diff_runs, error_items, summarise_group

SCHEMA_VERSION = "scalecert-report/1"
MAX_ALERT_ITEMS = 1000
DEFINITIONS = MappingProxyType({
    "vanilla_accuracy": "vanilla_prediction == label (unpruned model), over all listed images",
    "pruned_accuracy": "prediction == label (SIN-pruned model M(x)), over all listed images",
    "clean_accuracy": "clean_output == label (detection on the clean image returns the label), "
                      "over all listed images",
    "certified_accuracy": "certified, over all listed images",
    "false_alert_rate": "clean_output == -1 (ALERT on the clean image), over rows with status ok; "
                        "none for recovery methods, which never alert",
    "guarantee": "detection: a certified image gets its label or ALERT under any patch; "
                 "recovery: a certified image gets its label under any patch, and clean_output "
                 "is the recovered prediction (clean accuracy is recovered clean accuracy)",
    "errors_and_missing": "error rows and images of missing shards count as not correct and not "
                          "certified in every accuracy",
    "ci95": "95% Wilson score interval",
    "images_per_s": "1000 / mean latency_ms (per-image share of a worker's batch time), not the "
                    "run's wall-clock throughput",
    "diff_ci95": "new - old, Newcombe method 10 interval for paired proportions (same images)",
})


def build_report(run: RunData, published: tuple[PublishedRow, ...], against: RunData | None = None,
                 max_drop_pp: float = 1.0, worst: int = 10) -> dict[str, Any]:
    """The report document (see the module docstring for its keys)."""
    manifest = run.manifest
    dataset = manifest["dataset"]
    alerts = clean_alerts(run)
    errors = error_items(run)
    side = int(manifest.get("image_side") or 0)
    return {
        "schema": SCHEMA_VERSION,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {
            "location": run.location, "run_id": manifest["run_id"],
            "fingerprint": manifest["fingerprint"], "model": manifest["config"].get("model"),
            "checkpoint_sha256": manifest.get("checkpoint_sha256"),
            "source_sha256": manifest.get("source_sha256"),
            "package_versions": manifest.get("package_versions"),
            "preprocessing": manifest.get("preprocessing"),
            "version": manifest.get("version"), "created": manifest.get("created"),
            "image_side": side, "config": manifest["config"],
            "dataset": {"source": dataset.get("source"), "name": dataset_name(dataset.get("source", "")),
                        "layout": dataset.get("layout"), "classes": dataset.get("classes"),
                        "images": run.images},
        },
        "completeness": {
            "complete": not run.missing, "shards_listed": len(manifest["shards"]),
            "shards_present": len(manifest["shards"]) - len(run.missing),
            "missing_shards": [vars(m) for m in run.missing], "images_listed": run.images,
            "images_with_rows": int(run.rows["image_id"].nunique()),
            "images_missing": sum(m.images for m in run.missing),
        },
        "errors": {"images": len(errors), "items": errors},
        "definitions": dict(DEFINITIONS),
        "groups": [summarise_group(run, method, px, worst) for method, px in run.groups],
        "published": [row.to_dict() for row in relevant(published, side, int(dataset.get("classes") or 0))],
        "clean_alerts": {"total": len(alerts), "items": alerts[:MAX_ALERT_ITEMS]},
        "diff": None if against is None else diff_runs(run, against, max_drop_pp),
    }

