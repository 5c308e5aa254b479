"""Option parsing shared by ``scalecert certify`` and ``scalecert finetune``: patch sizes,
YAML option files, and validation that names the flag at fault. No torch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from scalecert.errors import InvalidOption

T = TypeVar("T")

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
