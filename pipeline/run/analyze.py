"""``scalecert analyze``: the paper's Fig. 1 SIN statistics (:mod:`scalecert.sin_stats`) on a
labelled dataset, in this process (no Ray).

The options reuse the certify run's (:class:`RunConfig`: data, model, checkpoint, one patch,
one method, top-k, masks per axis, layer) and the attack run's (:class:`AttackOptions`: the
per-image attack, on the undefended model by default as in the paper's analysis), so they are
validated by the same code and name the same flags. Everything is checked before the model
is loaded; what needs the model (the patch fits, the layer exists, ``count`` neurons exist) is
checked before any image is read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.compute.batches import load_spread
from pipeline.compute.models import PREPROCESSING_OPTIONS, as_flag_message, load_stored_model
from pipeline.io.images import Preprocess
from pipeline.io import storage
from pipeline.options import positive_int, read_options, require, split_off
from pipeline.run.attack_config import AttackOptions
from pipeline.run.config import RunConfig
from scalecert import __version__
from scalecert.errors import InvalidOption
from scalecert.sin_stats import sin_statistics

SCHEMA_VERSION = "scalecert-analysis/1"
DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)
# The attack options `scalecert analyze` offers (the attack itself is always per-image).
ATTACK_KEYS = ("attack_model", "steps", "restarts", "step_size", "location", "seed")
# The run options it offers; the YAML file takes these keys and the analysis' own.
RUN_KEYS = ("data", "model", "checkpoint", "patches", "methods", "top_k", "masks_per_axis",
            "layer", "out", "s3_endpoint", *PREPROCESSING_OPTIONS)
OWN_KEYS = ("images", "count", "alphas")
# repeatable options: flag (and YAML) name -> field; one value becomes a tuple
REPEATABLE = {**RunConfig.REPEATABLE, "alpha": "alphas"}


def paper_attack() -> AttackOptions:
    """The attack of the paper's analysis: per-image patches against the undefended model."""
    return AttackOptions(attack="per-image", attack_model="undefended")


@dataclass(frozen=True)
class AnalyzeRun:
    """One ``scalecert analyze`` run (see ``scalecert analyze --help``).

    run: data, model, checkpoint, exactly one patch and one method, and the certification
    settings of M (top-k, masks per axis, layer); ``run.out`` is the output folder.
    options: the per-image attack. images: how many images, spread over the listing.
    alphas: the adaptive attack's penalty weights (Fig. 1e). count: top neurons per image.
    """

    run: RunConfig
    options: AttackOptions = field(default_factory=paper_attack)
    images: int = 500
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    count: int = 200

    def __post_init__(self) -> None:
        patches, methods = self.run.patches, self.run.methods
        require(len(patches) == 1, "patch",
                f"exactly one patch size, got {len(patches)}: {', '.join(patches)}")
        require(len(methods) == 1, "method",
                f"exactly one method, got {len(methods)}: {', '.join(methods)}")
        require(self.options.attack == "per-image", "attack",
                f"per-image (the adaptive sweep runs on its own), got {self.options.attack!r}")
        positive_int(self.images, "images")
        positive_int(self.count, "count")
        alphas = self.alphas if isinstance(self.alphas, (tuple, list)) else (self.alphas,)
        require(len(alphas) > 0, "alpha", "at least one value")
        for alpha in alphas:
            require(not isinstance(alpha, bool) and isinstance(alpha, (int, float))
                    and math.isfinite(alpha) and alpha >= 0, "alpha",
                    f"finite numbers >= 0, got {alpha!r}")
        require(len(set(alphas)) == len(alphas), "alpha",
                f"distinct values, got {', '.join(f'{a:g}' for a in alphas)}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in alphas))

    @property
    def patch(self) -> str:
        return self.run.patches[0]

    @property
    def method(self) -> str:
        return self.run.methods[0]

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, flags: Mapping[str, Any]) -> AnalyzeRun:
        """Options from a YAML file (keys as on the command line, ``alpha`` a list) with
        ``flags`` (the flags given) taking precedence; the attack's keys go to
        :class:`AttackOptions` (over :func:`paper_attack`), ``images``, ``count`` and
        ``alphas`` stay here, the rest go to :class:`RunConfig`."""
        values = read_options(yaml_path, flags, RUN_KEYS + ATTACK_KEYS + OWN_KEYS, REPEATABLE,
                              RunConfig.REQUIRED)
        options = AttackOptions(**{**asdict(paper_attack()), **split_off(values, ATTACK_KEYS)})
        own = split_off(values, OWN_KEYS)
        return cls(run=RunConfig(**values), options=options, **own)


def run_analysis(run: AnalyzeRun, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Load the model once, read ``run.images`` images spread over the listing, run
    :func:`~scalecert.sin_stats.sin_statistics` on them and add the provenance: JSON values
    only, for :func:`pipeline.report.analysis.write_analysis`."""
    started = time.perf_counter()
    config = run.run
    s3 = storage.S3Options(endpoint=config.s3_endpoint)
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
