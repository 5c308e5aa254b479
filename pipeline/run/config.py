"""The run configuration: every option of ``scalecert certify``, validated before any work.

A ``RunConfig`` comes from command-line flags over an optional YAML file. ``fingerprint_fields``
are the options that change results; workers, addresses, batch sizes, precision and compilation
do not (the fast path re-checks close calls in fp32, see :mod:`scalecert.precision`), so a run
can be resumed with another cluster shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from scalecert import CertConfig, available_models
from scalecert.config import METHODS
from scalecert.precision import FastPath
from scalecert.errors import InvalidOption

_PATCH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|px)?\s*$")


@dataclass(frozen=True)
class PatchSize:
    """A patch side in pixels (``32``, ``32px``) or a share of the image area (``2%``)."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str | int | float) -> "PatchSize":
        match = _PATCH.match(str(text))
        if not match:
            raise InvalidOption(f"patch: {text!r} is neither pixels (32) nor a percentage (2%)")
        value, unit = float(match.group(1)), match.group(2)
        if unit == "%":
            if not 0 < value < 100:
                raise InvalidOption(f"patch: {text!r} must be a percentage in (0, 100)")
            return cls(value, True)
        if value != int(value) or value < 1:
            raise InvalidOption(f"patch: {text!r} must be a whole number of pixels >= 1")
        return cls(value, False)

    def pixels(self, side: int) -> int:
        """Side in pixels on a ``side x side`` image: for a percentage, the smallest side whose
        square covers that share of the area, to 0.1 px (the literature's convention:
        1/2/3% of 224 are 23/32/39 px, 0.4%/2.4% of 32 are 2/5 px)."""
        if not self.percent:
            return int(self.value)
        return max(1, math.ceil(math.sqrt(self.value / 100.0) * side - 0.1))

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


@dataclass(frozen=True)
class RunConfig:
    """Options of one certification run (see ``scalecert certify --help``)."""

    data: str
    model: str
    out: str
    patches: tuple[str, ...]
    checkpoint: str | None = None
    methods: tuple[str, ...] = ("scalecert",)
    top_k: float = 0.15
    masks_per_axis: int = 6
    r: int = 1
    layer: str | None = None
    margin: float = 1e-3
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
    batch_size: int | None = None  # None: 64 on a CPU, 256 on CUDA (see g_batch_size)
    precision: str = "auto"  # auto: bf16 on cuda, fp32 on cpu
    compile: bool | str = "auto"  # auto: on for cuda
    fuse_bn: bool | str = "auto"  # auto: on (fold g's BatchNorms into its convolutions)
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.data, str) and self.data, "data", "a local path or s3:// URI")
        require(isinstance(self.out, str) and self.out, "out", "a local path or s3:// URI")
        if self.model not in available_models():
            raise InvalidOption(
                f"model: unknown model {self.model!r}; available: {', '.join(available_models())}"
            )
        patches = tuple(str(p) for p in self.patches)
        require(len(patches) > 0, "patch", "at least one patch size")
        object.__setattr__(self, "patches", tuple(str(PatchSize.parse(p)) for p in patches))
        require(len(set(self.patches)) == len(self.patches), "patch", "distinct patch sizes")
        methods = tuple(self.methods)
        require(len(methods) > 0, "method", "at least one method")
        for method in methods:
            require(method in METHODS, "method", f"one of {', '.join(METHODS)} (got {method!r})")
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
        try:
            return CertConfig(
                patch_px=patch_px, top_k=self.top_k, masks_per_axis=self.masks_per_axis,
                r=self.r, method=method, layer=self.layer, margin=self.margin,
            )
        except ValueError as exc:  # "top_k: ..." -> "--top-k: ...", the flag the user knows
            name, _, rest = str(exc).partition(":")
            raise InvalidOption(f"--{name.replace('_', '-')}:{rest}") from None

    def g_batch_size(self, device: str) -> int:
        """(image, mask) pairs per run of g on ``device``: ``batch_size``, or by default 256 on
        CUDA and 64 on a CPU, where g's activations then stay in cache (ResNet-20 g alone:
        3,600 images/s at 64 against 2,500 at 256 on the 2-core machine)."""
        if self.batch_size is not None:
            return self.batch_size
        return 256 if torch.device(device).type == "cuda" else 64

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
        return {name: _jsonable(getattr(self, name)) for name in keep}

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None, overrides: dict[str, Any]) -> "RunConfig":
        """Options from a YAML file (keys as on the command line, dashes or underscores), with
        ``overrides`` (flags the user gave) taking precedence."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            values.update(load_yaml(yaml_path))
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


def load_yaml(path: str | Path, known: frozenset[str] | None = None) -> dict[str, Any]:
    """Read a run YAML file: a mapping of option names (``top-k`` or ``top_k``) to values.

    ``known``: the accepted names (underscored); default: the options of ``scalecert certify``.
    """
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidOption(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidOption(f"config: {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise InvalidOption(f"config: {path} must hold a mapping of option names to values")
    if known is None:
        known = frozenset({f.name for f in fields(RunConfig)} | {"patch", "method"})
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InvalidOption(f"config: {path}: unknown option {key!r}")
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def require(condition: bool, option: str, expected: str) -> None:
    if not condition:
        raise InvalidOption(f"--{option}: expected {expected}")


def positive_int(value: Any, option: str) -> None:
    require(not isinstance(value, bool) and isinstance(value, int) and value >= 1, option,
             f"an integer >= 1, got {value!r}")
