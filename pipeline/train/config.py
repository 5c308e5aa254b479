"""The fine-tuning run configuration: every option of ``scalecert finetune``, validated once.

A ``FinetuneRun`` comes from command-line flags over an optional YAML file, read as for the
certification ``RunConfig`` (:func:`pipeline.options.read_options`). Its certification
settings and training settings default to the library's (:class:`~scalecert.config.CertConfig`,
:class:`~scalecert.training.FinetuneConfig`). ``fingerprint_fields`` are the options that
change the trained weights; workers, devices and addresses do not, so an interrupted run can be
resumed on another cluster shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from pipeline.compute.models import (
    PREPROCESSING_OPTIONS,
    check_model_options,
    declared_preprocessing,
)
from pipeline.options import (
    CERT_DEFAULTS,
    PatchSize,
    as_flag_errors,
    cert_config,
    option_names,
    positive_int,
    read_options,
    require,
)
from scalecert.config import CertConfig
from scalecert.methods.registry import available_methods
from scalecert.models import Preprocessing, parse_spec
from scalecert.training import FinetuneConfig

_LIBRARY = FinetuneConfig(cert=CERT_DEFAULTS)  # the library's training defaults


@dataclass(frozen=True)
class FinetuneRun:
    """Options of one fine-tuning run (see ``scalecert finetune --help``).

    ``batch_size`` is the global batch (split evenly over the workers), so the optimisation is
    the same whatever the number of workers; ``lr`` follows a cosine schedule over all steps.
    ``patch`` is the size's canonical text (``2.4%``, ``5``), parsed once, here.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "model", "out", "patch")

    data: str
    model: str
    out: str
    patch: str
    checkpoint: str | None = None
    # the model's preprocessing (scalecert.models.Preprocessing); None: the model's default
    input_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # the certification setting trained for: the library's defaults (CertConfig's)
    method: str = CERT_DEFAULTS.method
    top_k: float = CERT_DEFAULTS.top_k
    masks_per_axis: int = CERT_DEFAULTS.masks_per_axis  # 6: CertConfig resolves its None
    r: int = CERT_DEFAULTS.r
    layer: str | None = CERT_DEFAULTS.layer
    epochs: int = 10  # the library's FinetuneConfig trains 1 epoch; a run of the command, 10
    batch_size: int = _LIBRARY.batch_size
    lr: float = _LIBRARY.lr
    momentum: float = _LIBRARY.momentum
    weight_decay: float = _LIBRARY.weight_decay
    mask_probability: float = _LIBRARY.mask_probability
    augment: bool = _LIBRARY.augment
    seed: int = _LIBRARY.seed
    objective: str = _LIBRARY.objective
    limit: int | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    workers: int | None = None
    device: str = "auto"
    address: str | None = None
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.data, str) and bool(self.data), "data",
                "a local path or s3:// URI")
        require(isinstance(self.out, str) and bool(self.out), "out", "a local path or s3:// URI")
        check_model_options(self)
        require(parse_spec(self.model).kind != "export", "model",
                "a model that can train: an exported program (export:) is fixed in eval mode "
                "when it is exported (batch norm statistics, dropout); fine-tune it through "
                "file: or module: and export the result again")
        size = PatchSize.parse(self.patch)  # the one parse of the patch
        object.__setattr__(self, "_patch_size", size)
        object.__setattr__(self, "patch", str(size))
        require(self.method in available_methods(), "method",
                f"one of {', '.join(available_methods())}, got "
                f"{self.method!r}")
        positive_int(self.epochs, "epochs")
        positive_int(self.batch_size, "batch-size")
        positive_int(self.masks_per_axis, "masks-per-axis")
        for name in ("limit", "eval_limit", "workers"):
            value = getattr(self, name)
            if value is not None:
                positive_int(value, name.replace("_", "-"))
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
                f"an integer, got {self.seed!r}")
        require(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
        require(self.eval_limit is None or self.eval_data is not None, "eval-limit",
                "--eval-data as well")
        if self.workers is not None:
            require(self.batch_size % self.workers == 0, "batch-size",
                    f"a multiple of --workers ({self.workers}), got {self.batch_size}")
        for name in ("lr", "momentum", "weight_decay", "mask_probability"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value), name.replace("_", "-"), f"a number, got {value!r}")
        self.finetune_config(32)  # the library validates the rest and names the field

    def reads(self) -> tuple[tuple[str, str | None], ...]:
        """The locations the run reads, each with its flag (None: not given): what the
        preflight checks before any work."""
        return (("--data", self.data), ("--eval-data", self.eval_data),
                ("--checkpoint", self.checkpoint), ("--model", parse_spec(self.model).path))

    def preprocessing(self) -> Preprocessing:
        """The preprocessing declared by ``--input-size`` ... ``--std`` (None fields: the
        model's own)."""
        return declared_preprocessing(self)

    @property
    def patch_size(self) -> PatchSize:
        """The patch size, as parsed when the options were validated."""
        return self._patch_size  # type: ignore[attr-defined]

    def cert_config(self, image_side: int) -> CertConfig:
        """The certification setting trained for, on ``image_side`` x ``image_side`` inputs."""
        return cert_config(self, self.patch_size.pixels(image_side), self.method)

    def finetune_config(self, image_side: int) -> FinetuneConfig:
        """The library's training settings for ``image_side`` x ``image_side`` inputs."""
        cert = self.cert_config(image_side)
        return as_flag_errors(lambda: FinetuneConfig(
            cert=cert, epochs=self.epochs, batch_size=self.batch_size, lr=float(self.lr),
            momentum=float(self.momentum), weight_decay=float(self.weight_decay),
            mask_probability=float(self.mask_probability), augment=bool(self.augment),
            seed=self.seed, objective=self.objective,
        ))

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options that determine the trained weights (for the run fingerprint)."""
        skip = {"out", "workers", "device", "address", "s3_endpoint"}
        if self.objective == _LIBRARY.objective:
            skip.add("objective")  # absent when default: earlier runs keep resuming
        # likewise the preprocessing, absent when not declared
        skip.update(name for name in PREPROCESSING_OPTIONS if getattr(self, name) is None)
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def command_line(self) -> str:
        """The ``scalecert finetune`` command for these options (defaults left out)."""
        words = ["scalecert", "finetune"]
        for item in fields(self):
            value = getattr(self, item.name)
            if value == item.default and item.name not in ("data", "model", "out", "patch"):
                continue
            flag = "--" + item.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{item.name.replace('_', '-')}")
            elif isinstance(value, tuple):  # --mean R,G,B and --std R,G,B
                words += [flag, ",".join(f"{v:g}" for v in value)]
            else:
                words += [flag, str(value)]
        return " ".join(words)

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, flags: Mapping[str, Any]) -> FinetuneRun:
        """Options from a YAML file (keys as on the command line), flags taking precedence."""
        return cls(**read_options(yaml_path, flags, option_names(cls), required=cls.REQUIRED))
