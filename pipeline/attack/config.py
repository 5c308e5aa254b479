"""The options of ``scalecert attack``: a certification run's options plus the attack's, all
validated before any work.

An attack run certifies every clean image with the run's options (the ``certified`` column)
and attacks it with :mod:`scalecert.attacks`; the defense then runs on the attacked image.
The attack options enter the run fingerprint, so changing any of them needs a new ``--out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.options import (
    as_flag_errors,
    option_names,
    positive_int,
    read_options,
    require,
    split_off,
)
from pipeline.run.config import RunConfig
from scalecert.attack_registry import attack_info, available_attacks
from scalecert.attacks import ATTACK_MODELS, AttackConfig


_LIBRARY = AttackConfig(patch_px=1)  # the library's defaults are the command's


@dataclass(frozen=True)
class AttackOptions:
    """How each image is attacked (see ``scalecert attack --help``); ``universal_*``: the
    training split and budget of the universal patch (``--attack universal`` only)."""

    attack: str = _LIBRARY.attack
    attack_model: str = "defended"
    steps: int = _LIBRARY.steps
    restarts: int = _LIBRARY.restarts
    step_size: float = _LIBRARY.step_size
    location: str = _LIBRARY.location
    eot: int = _LIBRARY.eot
    alpha: float = _LIBRARY.alpha
    target: int | None = _LIBRARY.target
    seed: int = _LIBRARY.seed
    universal_data: str | None = None
    universal_images: int = 1000
    universal_epochs: int = 2

    def __post_init__(self) -> None:
        require(self.attack in available_attacks(), "attack",
                f"one of {', '.join(available_attacks())}, got {self.attack!r}")
        require(self.attack_model in ATTACK_MODELS, "attack-model",
                f"one of {', '.join(ATTACK_MODELS)}, got {self.attack_model!r}")
        positive_int(self.universal_images, "universal-images")
        positive_int(self.universal_epochs, "universal-epochs")
        if attack_info(self.attack).trains_patch:
            require(isinstance(self.universal_data, str) and bool(self.universal_data),
                    "universal-data", "a labelled training folder (local or s3://) to train "
                    "the universal patch on")
        else:
            require(self.universal_data is None, "universal-data",
                    f"no value unless --attack universal (the attack is {self.attack})")
        self.attack_config(1)  # the library checks the rest and names the field

    def attack_config(self, patch_px: int) -> AttackConfig:
        """The library's configuration for patches of ``patch_px``."""
        shared = {f.name: getattr(self, f.name) for f in fields(AttackConfig)
                  if f.name != "patch_px"}
        return as_flag_errors(lambda: AttackConfig(patch_px=patch_px, **shared))

    def to_dict(self) -> dict[str, Any]:
        """The attack options as the manifest records them (``attack``)."""
        return asdict(self)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The attack options as the run fingerprint takes them; the run's own options enter
        it as for certify."""
        return {"job": "attack", **self.to_dict()}


@dataclass(frozen=True)
class AttackRun:
    """One ``scalecert attack`` run: where and what to certify (``run``), how to attack."""

    run: RunConfig
    options: AttackOptions

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, flags: Mapping[str, Any]) -> AttackRun:
        """Options from a YAML file with flags taking precedence, as for ``certify``; the
        attack's keys go to :class:`AttackOptions`, the rest to :class:`RunConfig`."""
        attack_names = option_names(AttackOptions)
        values = read_options(yaml_path, flags, option_names(RunConfig) | attack_names,
                              RunConfig.REPEATABLE, RunConfig.REQUIRED)
        options = AttackOptions(**split_off(values, attack_names))  # before the run's options
        return cls(run=RunConfig(**values), options=options)
