"""``scalecert analyze``: the paper's Fig. 1 SIN statistics (:mod:`scalecert.sin_stats`) on a
labelled dataset, in this process (no Ray), with the options of :mod:`pipeline.analyze.config`.
Everything is checked before the model is loaded; what needs the model (the patch fits, the
layer exists, ``count`` neurons exist) is checked before any image is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.analyze.config import AnalyzeRun
from pipeline.compute.batches import load_spread
from pipeline.compute.models import as_flag_message, load_stored_model
from pipeline.io import preflight, storage
from pipeline.io.images import Preprocess
from pipeline.options import require
from scalecert import __version__
from scalecert.errors import InvalidOption
from scalecert.sin_stats import sin_statistics

SCHEMA_VERSION = "scalecert-analysis/1"


def run_analysis(run: AnalyzeRun, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Load the model once, read ``run.images`` images spread over the listing, run
    :func:`~scalecert.sin_stats.sin_statistics` on them and add the provenance: JSON values
    only, for :func:`pipeline.report.analysis.write_analysis`."""
    started = time.perf_counter()
    config = run.run
    s3 = storage.S3Options(endpoint=config.s3_endpoint)
    preflight.check_locations(config.out, config.reads(), s3)
    try:  # the model and its weights are checked before any image is read
        model = load_stored_model(config.model, config.checkpoint, s3,
                                  preprocessing=config.preprocessing())
    except FileNotFoundError as exc:
        raise InvalidOption(as_flag_message(exc, "--checkpoint")) from None
    except InvalidOption as exc:
        raise InvalidOption(as_flag_message(exc)) from exc
    patch_px = config.patch_pixels(model.input_size)[0]
    layer = _check_against_model(run, model, patch_px)
    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    log(f"model {config.model} ({model.checkpoint_sha256 or 'random weights'}), layer {layer}, "
        f"{patch_px} px patches, on {device}")
    images, labels = load_spread(config.data, run.images, model.num_classes,
                                 Preprocess.of(model.preprocessing), s3)
    log(f"{len(labels)} images from {config.data}"
        + ("" if len(labels) == run.images else f" ({run.images} asked for)"))
    cert = config.cert_config(patch_px, run.method)
    stats = sin_statistics(model, cert, images.to(device), labels,
                           run.options.attack_config(patch_px), alphas=run.alphas,
                           count=run.count, attack_model=run.options.attack_model)
    return {
        "schema": SCHEMA_VERSION,
        **stats,
        "provenance": {
            "data": config.data, "model": config.model, "checkpoint": config.checkpoint,
            "checkpoint_sha256": model.checkpoint_sha256, "image_side": model.input_size,
            "source_sha256": model.source_sha256,
            "package_versions": dict(model.package_versions),
            "preprocessing": model.preprocessing.declared(),
            "classes": model.num_classes, "patch": run.patch, "patch_px": patch_px,
            "method": run.method, "top_k": config.top_k,
            "masks_per_axis": config.masks_per_axis, "images_requested": run.images,
            "images": len(labels), "alphas": list(run.alphas), "device": device,
            "seconds": round(time.perf_counter() - started, 3), "version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def _check_against_model(run: AnalyzeRun, model: nn.Module, patch_px: int) -> str:
    """The options only the model can check, before any image is read: the patch fits the
    image, the layer exists, and it has ``count`` neurons. Returns the layer's name."""
    side = model.input_size
    require(patch_px <= side, "patch",
            f"a patch no larger than the {side} px images, got {run.patch} ({patch_px} px)")
    try:
        split = model.split(run.run.layer)
    except InvalidOption as exc:
        raise InvalidOption(as_flag_message(exc, "--layer")) from exc
    with torch.no_grad():
        neurons = split.stem(torch.zeros(1, 3, side, side)).numel()
    require(run.count <= neurons, "count",
            f"at most {neurons} (the neurons of layer {split.layer}), got {run.count}")
    return split.layer
