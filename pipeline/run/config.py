"""The run configuration: every option of ``scalecert certify``, validated before any work.

A ``RunConfig`` comes from command-line flags over an optional YAML file. ``fingerprint_fields``
are the options that change results; workers, addresses, batch sizes, precision and compilation
do not (the fast path re-checks close calls in fp32, see :mod:`scalecert.precision`), so a run
can be resumed with another cluster shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.compute.models import (
    PREPROCESSING_OPTIONS,
    check_model_options,
    declared_preprocessing,
)
from pipeline.options import PatchSize, as_flag_errors, load_yaml, positive_int, require
from scalecert.certify import default_batch_size
from scalecert.config import DEFAULT_WINDOW_LAYOUT, CertConfig
from scalecert.errors import InvalidOption
from scalecert.methods.registry import available_methods
from scalecert.models import Preprocessing
from scalecert.precision import FastPath


@dataclass(frozen=True)
class RunConfig:
    """Options of one certification run (see ``scalecert certify --help``)."""

    data: str
    model: str
    out: str
    patches: tuple[str, ...]
    checkpoint: str | None = None
    # the model's preprocessing (scalecert.models.Preprocessing); None: the model's default
    input_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    methods: tuple[str, ...] = ("scalecert",)
    top_k: float = 0.15
    masks_per_axis: int = 6
    r: int = 1
    layer: str | None = None
    margin: float = 1e-3
    alert_confidence: float | None = None
    vote: str = "unanimous"
    window_layout: str = DEFAULT_WINDOW_LAYOUT  # scalecert.config.WINDOW_LAYOUTS
    full_map: bool = False
    ground_truth: str | None = None
    synsets: str | None = None
    shard_size: int = 256
    limit: int | None = None
    resume: bool = True
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    device: str = "auto"
    batch_size: int | None = None  # None: the library's default for the device
    precision: str = "auto"  # auto: bf16 on cuda, fp32 on cpu
    compile: bool | str = "auto"  # auto: on for cuda
    fuse_bn: bool | str = "auto"  # auto: on (fold g's BatchNorms into its convolutions)
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.data, str) and self.data, "data", "a local path or s3:// URI")
        require(isinstance(self.out, str) and self.out, "out", "a local path or s3:// URI")
        check_model_options(self)
        patches = tuple(str(p) for p in self.patches)
        require(len(patches) > 0, "patch", "at least one patch size")
        object.__setattr__(self, "patches", tuple(str(PatchSize.parse(p)) for p in patches))
        require(len(set(self.patches)) == len(self.patches), "patch", "distinct patch sizes")
        methods = tuple(self.methods)
        require(len(methods) > 0, "method", "at least one method")
        for method in methods:
            require(method in available_methods(), "method",
                    f"one of {', '.join(available_methods())} (got {method!r})")
        require(len(set(methods)) == len(methods), "method", "distinct methods")
        object.__setattr__(self, "methods", methods)
        positive_int(self.shard_size, "shard-size")
        if self.batch_size is not None:
            positive_int(self.batch_size, "batch-size")
        positive_int(self.masks_per_axis, "masks-per-axis")
        if self.limit is not None:
            positive_int(self.limit, "limit")
        if self.workers is not None:
            positive_int(self.workers, "workers")
        if self.gpus_per_worker is not None:
            require(
                isinstance(self.gpus_per_worker, (int, float)) and self.gpus_per_worker >= 0,
                "gpus-per-worker", "a number >= 0",
            )
        require(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda")
        require(self.precision in ("auto", "fp32", "bf16"), "precision",
                f"auto, fp32 or bf16, got {self.precision!r}")
        require(isinstance(self.compile, bool) or self.compile == "auto", "compile",
                f"true, false or auto, got {self.compile!r}")
        require(isinstance(self.fuse_bn, bool) or self.fuse_bn == "auto", "fuse-bn",
                f"true, false or auto, got {self.fuse_bn!r}")
        # the certification settings are validated by CertConfig itself (names its fields)
        for method in self.methods:
            self.cert_config(1, method)

    def cert_config(self, patch_px: int, method: str) -> CertConfig:
        """The library configuration for one (patch size in pixels, method)."""
        return as_flag_errors(lambda: CertConfig(
            patch_px=patch_px, top_k=self.top_k, masks_per_axis=self.masks_per_axis,
            r=self.r, method=method, layer=self.layer, margin=self.margin,
            alert_confidence=self.alert_confidence, vote=self.vote,
            window_layout=self.window_layout,
        ))

    def preprocessing(self) -> Preprocessing:
        """The preprocessing declared by ``--input-size`` ... ``--std`` (None fields: the
        model's own)."""
        return declared_preprocessing(self)

    def g_batch_size(self, device: str) -> int:
        """(image, mask) pairs per run of g on ``device``: ``batch_size``, or the library's
        default for the device (:func:`scalecert.certify.default_batch_size`)."""
        return default_batch_size(device) if self.batch_size is None else self.batch_size

    def fast_path(self, device: str) -> FastPath:
        """How workers on ``device`` run g: ``auto`` means bf16 and compiled on CUDA, fp32
        elsewhere, with BatchNorm folded everywhere. Certificates' outcomes do not depend on it
        (close calls re-run in eager fp32)."""
        on_cuda = torch.device(device).type == "cuda"
        precision = ("bf16" if on_cuda else "fp32") if self.precision == "auto" else self.precision
        compile_g = on_cuda if self.compile == "auto" else bool(self.compile)
        fuse_bn = True if self.fuse_bn == "auto" else bool(self.fuse_bn)
        return FastPath(precision=precision, compile=compile_g, fuse_bn=fuse_bn)

    def patch_pixels(self, side: int) -> tuple[int, ...]:
        return tuple(PatchSize.parse(p).pixels(side) for p in self.patches)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options that determine the certificates (for the run fingerprint)."""
        keep = ("data", "model", "patches", "methods", "top_k", "masks_per_axis", "r", "layer",
                "margin", "full_map", "ground_truth", "shard_size", "limit")
        fields_ = {name: _jsonable(getattr(self, name)) for name in keep}
        # new options enter only when set, so runs of earlier versions keep resuming
        if self.alert_confidence is not None:
            fields_["alert_confidence"] = self.alert_confidence
        if self.vote != "unanimous":
            fields_["vote"] = self.vote
        if self.window_layout != DEFAULT_WINDOW_LAYOUT:
            fields_["window_layout"] = self.window_layout
        for name in PREPROCESSING_OPTIONS:
            if getattr(self, name) is not None:
                fields_[name] = _jsonable(getattr(self, name))
        return fields_

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, overrides: dict[str, Any]) -> "RunConfig":
        """Options from a YAML file (keys as on the command line, dashes or underscores), with
        ``overrides`` (flags the user gave) taking precedence."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            known = frozenset({f.name for f in fields(cls)} | {"patch", "method"})
            values.update(load_yaml(yaml_path, known))
        values.update({k: v for k, v in overrides.items() if v is not None})
        for plural, singular in (("patches", "patch"), ("methods", "method")):
            if singular in values:
                values[plural] = values.pop(singular)
            if isinstance(values.get(plural), (str, int, float)):
                values[plural] = (values[plural],)
        missing = [name for name in ("data", "model", "out", "patches") if name not in values]
        if missing:
            flags = ", ".join("--" + ("patch" if m == "patches" else m) for m in missing)
            raise InvalidOption(f"missing required option(s): {flags}")
        return cls(**values)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
