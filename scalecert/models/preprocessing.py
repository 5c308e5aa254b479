"""How images become a model's input, declared with the model.

A :class:`Preprocessing` says which square side the model takes (``input_size``), whether
images are resized first (``resize``: the short side, then a centre crop to ``input_size``;
None: images must already be ``input_size`` square, as for CIFAR), with which filter, and the
per-channel ``mean`` and ``std`` the model expects. Resizing and cropping happen where images
are decoded (the pipeline); normalisation happens inside the wrapped model, so that masks and
windows act on [0, 1] pixels.

One value is two things: what the user declared (any field may be None) and, once resolved
against the model's defaults (:func:`resolve`), what a run uses (``input_size`` and
``interpolation`` set). The fields are validated when the value is made, and messages start
with the field's name (``input_size: ...``), which the command line turns into its flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from scalecert.errors import InvalidOption

INTERPOLATIONS = ("bilinear", "bicubic")
MIN_INPUT_SIZE = 8
FIELDS = ("input_size", "resize", "interpolation", "mean", "std")

Triple = tuple[float, float, float]


def parse_triple(value: Any, name: str) -> Triple:
    """Three finite floats from ``"R,G,B"`` text or a sequence of three numbers (a YAML list,
    a tuple); an :class:`InvalidOption` naming ``name`` otherwise."""
    items: Sequence[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise InvalidOption(f"{name}: expected three numbers R,G,B, got {value!r}")
    if len(items) != 3:
        raise InvalidOption(f"{name}: expected three numbers R,G,B, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool):
            raise InvalidOption(f"{name}: expected three numbers R,G,B, got {value!r}")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise InvalidOption(f"{name}: expected three numbers R,G,B, got {value!r}") from None
        if not math.isfinite(number):
            raise InvalidOption(f"{name}: expected finite numbers, got {value!r}")
        out.append(number)
    return (out[0], out[1], out[2])


def _side(value: Any, name: str, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOption(f"{name}: expected an integer >= {minimum}{what}, got {value!r}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """A model's preprocessing (module docstring); None fields are not declared.

    ``mean`` and ``std`` take three numbers as a tuple, a list or ``"R,G,B"`` text; they are
    stored as tuples of floats. Invariants, checked here: ``input_size >= 8``; ``resize >=
    input_size``; ``interpolation`` bilinear or bicubic; ``std`` > 0 per channel.
    """

    input_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    mean: Triple | None = None
    std: Triple | None = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            _side(self.input_size, "input_size", MIN_INPUT_SIZE, " (the model's image side)")
        if self.resize is not None:
            minimum = self.input_size if self.input_size is not None else MIN_INPUT_SIZE
            _side(self.resize, "resize", minimum,
                  " (the short side before the centre crop; at least input_size)")
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise InvalidOption(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, "
                                f"got {self.interpolation!r}")
        if self.mean is not None:
            object.__setattr__(self, "mean", parse_triple(self.mean, "mean"))
        if self.std is not None:
            std = parse_triple(self.std, "std")
            if min(std) <= 0:
                raise InvalidOption(f"std: expected three numbers > 0, got {self.std!r}")
            object.__setattr__(self, "std", std)

    def declared(self) -> dict[str, Any]:
        """The fields that are set, JSON-ready (tuples as lists)."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def over(self, defaults: Preprocessing | None) -> Preprocessing:
        """These declared fields over ``defaults`` (a model's own preprocessing)."""
        if defaults is None:
            return self
        return replace(defaults, **{name: getattr(self, name) for name in FIELDS
                                    if getattr(self, name) is not None})

    @property
    def is_resolved(self) -> bool:
        return self.input_size is not None and self.interpolation is not None

    def describe(self) -> str:
        """One line for logs and reports: ``224 px from short side 256 (bicubic), mean ...``."""
        if self.input_size is None:
            return "not declared"
        text = f"{self.input_size} px"
        text += (f" from short side {self.resize} ({self.interpolation or 'bilinear'}), centre crop"
                 if self.resize is not None else " exact (no resize)")
        if self.mean is not None and self.std is not None:
            text += (f", mean {','.join(f'{v:g}' for v in self.mean)}, "
                     f"std {','.join(f'{v:g}' for v in self.std)}")
        return text


def resolve(declared: Preprocessing | None, defaults: Preprocessing | None,
            model: str) -> Preprocessing:
    """``declared`` over the model's ``defaults``, with ``interpolation`` bilinear when
    neither says; refused when no input size results (a user model must declare one, naming
    what to declare) or when the merged values contradict each other (``resize`` smaller than
    ``input_size``)."""
    merged = (declared or Preprocessing()).over(defaults)
    if merged.input_size is None:
        raise InvalidOption(
            f"input_size: model {model} declares no input size; declare its preprocessing: "
            "--input-size N (the square side it takes), and as needed --resize N (short side "
            "before a centre crop; without it images must already be N x N), --interpolation "
            "bilinear|bicubic, --mean R,G,B and --std R,G,B (when normalisation is not inside "
            "the model)"
        )
    if (merged.mean is None) != (merged.std is None):
        given, missing = ("mean", "std") if merged.std is None else ("std", "mean")
        raise InvalidOption(f"{missing}: model {model} needs a {missing} with its {given} "
                            "(normalisation takes both, three numbers each)")
    if merged.interpolation is None:
        merged = replace(merged, interpolation="bilinear")
    return Preprocessing(**{name: getattr(merged, name) for name in FIELDS})  # re-validated
