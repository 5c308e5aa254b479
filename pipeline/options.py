"""Option reading shared by every job (certify, attack, analyze, finetune): patch sizes, one
reading of a YAML file and the flags given (:func:`read_options`), the library's
certification defaults that every job's options take (:data:`CERT_DEFAULTS`), one mapping of
a job's options onto :class:`~scalecert.config.CertConfig` (:func:`cert_config`), and
validation that names the flag at fault. No torch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from scalecert.config import CertConfig
from scalecert.errors import InvalidOption

T = TypeVar("T")

# The library's certification settings left at their defaults: the one place a job's options
# (RunConfig, FinetuneRun, and through them attack and analyze) and so the CLI's help read
# top_k, masks_per_axis, r, method, layer, margin, alert_confidence, vote and window_layout from.
CERT_DEFAULTS = CertConfig(patch_px=1)

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


def option_names(options: type) -> frozenset[str]:
    """The option names (underscored) of a job's options dataclass: its fields."""
    return frozenset(f.name for f in fields(options))


def read_options(yaml_path: str | Path | None, flags: Mapping[str, Any], names: Iterable[str],
                 repeatable: Mapping[str, str] | None = None,
                 required: Iterable[str] = ()) -> dict[str, Any]:
    """A job's option values, read one way for every job: the YAML file's (keys as on the
    command line, dashes or underscores), with the flags given taking precedence (a flag not
    given is None, or () for a repeatable one).

    names: the option names the job takes. repeatable: a repeatable option's flag name -> its
    field (``patch`` -> ``patches``): either name is taken, and a single value becomes a
    tuple. required: the fields that must be given; the missing ones are listed by flag.
    """
    repeatable = dict(repeatable or {})
    known = frozenset(names) | frozenset(repeatable)
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml(yaml_path, known))
    given = {name: value for name, value in flags.items() if value is not None and value != ()}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InvalidOption(f"unknown option(s): {', '.join(unknown)}")
    values.update(given)
    for flag, name in repeatable.items():
        if flag in values:
            values[name] = values.pop(flag)
        if name in values and not isinstance(values[name], (tuple, list)):
            values[name] = (values[name],)
    flag_of = {name: flag for flag, name in repeatable.items()}
    missing = ["--" + flag_of.get(name, name).replace("_", "-")
               for name in required if name not in values]
    if missing:
        raise InvalidOption(f"missing required option(s): {', '.join(missing)}")
    return values


def split_off(values: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The items of ``values`` named in ``names``, taken out of ``values``."""
    wanted = frozenset(names)
    return {name: values.pop(name) for name in list(values) if name in wanted}


def cert_config(options: Any, patch_px: int, method: str) -> CertConfig:
    """The library's configuration for patches of ``patch_px`` and ``method``, from a job's
    options: each CertConfig field the options have by name (``top_k``, ``r``, ...), the
    library's default for the others; its errors named by flag (``--top-k: ...``)."""
    shared = {f.name: getattr(options, f.name) for f in fields(CertConfig)
              if f.name not in ("patch_px", "method") and hasattr(options, f.name)}
    return as_flag_errors(lambda: CertConfig(patch_px=patch_px, method=method, **shared))


def load_yaml(path: str | Path, known: frozenset[str]) -> dict[str, Any]:
    """Read a run YAML file: a mapping of option names (``top-k`` or ``top_k``) to values;
    ``known``: the accepted names (underscored)."""
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
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise InvalidOption(f"config: {path}: unknown option {key!r}")
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


def require(condition: bool, option: str, expected: str) -> None:
    if not condition:
        raise InvalidOption(f"--{option}: expected {expected}")


def positive_int(value: Any, option: str) -> None:
    require(not isinstance(value, bool) and isinstance(value, int) and value >= 1, option,
             f"an integer >= 1, got {value!r}")


def as_flag_errors(build: Callable[[], T]) -> T:
    """``build()``, its library errors renamed to the command-line flag the user knows
    (``top_k: ...`` becomes ``--top-k: ...``)."""
    try:
        return build()
    except ValueError as exc:
        name, _, rest = str(exc).partition(":")
        raise InvalidOption(f"--{name.replace('_', '-')}:{rest}") from None
