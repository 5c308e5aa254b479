"""The run configuration: every option of ``scalecert certify``, validated before any work.

A ``RunConfig`` comes from command-line flags over an optional YAML file
(:func:`pipeline.options.read_options`, as for every job). Its certification settings default
to the library's (:data:`pipeline.options.CERT_DEFAULTS`) and map onto one
:class:`~scalecert.config.CertConfig` per (patch, method) through
:func:`pipeline.options.cert_config`. ``to_dict`` is the run's options as the manifest records
them; ``fingerprint_fields`` picks from it the options that change results; workers,
addresses, batch sizes, precision and compilation do not (the fast path re-checks close calls
in fp32, see :mod:`scalecert.precision`), so a run can be resumed with another cluster shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipeline.compute.models import (
    PREPROCESSING_OPTIONS,
    check_model_options,
    declared_preprocessing,
)
from pipeline.options import (
    CERT_DEFAULTS,
    PatchSize,
    cert_config,
    option_names,
    positive_int,
    read_options,
    require,
)
from scalecert.certify import default_batch_size
from scalecert.config import CertConfig
from scalecert.methods.registry import available_methods
from scalecert.models import Preprocessing, parse_spec
from scalecert.precision import FastPath


@dataclass(frozen=True)
class RunConfig:
    """Options of one certification run (see ``scalecert certify --help``).

    ``patches`` holds each size as its canonical text (``2.4%``, ``5``), parsed once, here:
    :attr:`patch_sizes` keeps the parsed sizes.
    """

    # repeatable options: flag (and YAML) name -> field; and the options that must be given
    REPEATABLE: ClassVar[Mapping[str, str]] = {"patch": "patches", "method": "methods"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "model", "out", "patches")
    # the fingerprint's options; the OPTIONAL ones enter only when not at their default, so
    # runs of earlier versions (which had no such option) keep resuming
    FINGERPRINT: ClassVar[tuple[str, ...]] = (
        "data", "model", "patches", "methods", "top_k", "masks_per_axis", "r", "layer",
        "margin", "full_map", "ground_truth", "shard_size", "limit")
    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "alert_confidence", "vote", "window_layout", *PREPROCESSING_OPTIONS)

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
    # the certification settings: the library's defaults (CertConfig's)
    methods: tuple[str, ...] = (CERT_DEFAULTS.method,)
    top_k: float = CERT_DEFAULTS.top_k
    masks_per_axis: int = CERT_DEFAULTS.masks_per_axis  # 6: CertConfig resolves its None
    r: int = CERT_DEFAULTS.r
    layer: str | None = CERT_DEFAULTS.layer
    margin: float = CERT_DEFAULTS.margin
    alert_confidence: float | None = CERT_DEFAULTS.alert_confidence
    vote: str = CERT_DEFAULTS.vote
    window_layout: str = CERT_DEFAULTS.window_layout  # scalecert.config.WINDOW_LAYOUTS
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
        sizes = tuple(PatchSize.parse(p) for p in patches)  # the one parse of the patches
        object.__setattr__(self, "_patch_sizes", sizes)
        object.__setattr__(self, "patches", tuple(str(size) for size in sizes))
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
        return cert_config(self, patch_px, method)

    def reads(self) -> tuple[tuple[str, str | None], ...]:
        """The locations the run reads, each with its flag (None: not given): what the
        preflight checks before any work."""
        return (("--data", self.data), ("--checkpoint", self.checkpoint),
                ("--model", parse_spec(self.model).path),
                ("--ground-truth", self.ground_truth), ("--synsets", self.synsets))

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

    @property
    def patch_sizes(self) -> tuple[PatchSize, ...]:
        """The patch sizes, as parsed when the options were validated."""
        return self._patch_sizes  # type: ignore[attr-defined]

    def patch_pixels(self, side: int) -> tuple[int, ...]:
        """Each patch's side in pixels on ``side`` x ``side`` images."""
        return tuple(size.pixels(side) for size in self.patch_sizes)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The options that determine the certificates (for the run fingerprint), as
        :meth:`to_dict` records them."""
        recorded = self.to_dict()
        defaults = {f.name: f.default for f in fields(self)}
        return {**{name: recorded[name] for name in self.FINGERPRINT},
                **{name: recorded[name] for name in self.OPTIONAL
                   if getattr(self, name) != defaults[name]}}

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready (tuples as lists): the manifest's ``config``."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, flags: Mapping[str, Any]) -> RunConfig:
        """Options from a YAML file (keys as on the command line, dashes or underscores), with
        ``flags`` (the flags given) taking precedence."""
        return cls(**read_options(yaml_path, flags, option_names(cls), cls.REPEATABLE,
                                  cls.REQUIRED))


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
