"""The options of ``scalecert analyze`` (the paper's Fig. 1 SIN statistics; the run itself is
:mod:`pipeline.analyze.driver`).

The options reuse the certify run's (:class:`RunConfig`: data, model, checkpoint, one patch,
one method, top-k, masks per axis, layer) and the attack run's (:class:`AttackOptions`: the
per-image attack, on the undefended model by default as in the paper's analysis), so they are
validated by the same code and name the same flags. Everything is checked before the model
is loaded; what needs the model (the patch fits, the layer exists, ``count`` neurons exist) is
checked before any image is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.attack.config import AttackOptions
from pipeline.compute.models import PREPROCESSING_OPTIONS
from pipeline.options import positive_int, read_options, require, split_off
from pipeline.run.config import RunConfig

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

