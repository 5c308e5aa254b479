"""Method names -> what each method is, without importing torch (options, the CLI and the
report validate and list methods through this); :func:`load_method` imports a method's module.

One immutable mapping, like the model registry. Method ``name`` lives in the module
``scalecert.methods.<name>``, which defines ``predictor(model, config)`` and
``defended_logits(model, config, images, windows)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType

from scalecert.errors import InvalidOption

GUARANTEES = ("detection",)


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, the guarantee its certificates give, and one line on what
    it does (``scalecert methods`` prints it)."""

    name: str
    guarantee: str
    summary: str
    pruned: bool  # whether M is the SIN-pruned model (then the undefended model differs from M)

    def __post_init__(self) -> None:
        if self.guarantee not in GUARANTEES:
            raise InvalidOption(f"guarantee: one of {GUARANTEES}, got {self.guarantee!r}")


_METHODS: Mapping[str, MethodInfo] = MappingProxyType({
    "scalecert": MethodInfo(
        name="scalecert", guarantee="detection", pruned=True,
        summary="ScaleCert: SIN-pruned model, windows removed from the superficial features; "
                "windows that miss the kept positions need no run"),
    "masking": MethodInfo(
        name="masking", guarantee="detection", pruned=False,
        summary="Minority Reports certified detection: the unpruned model on images with each "
                "window's pixels occluded"),
})


def available_methods() -> tuple[str, ...]:
    """Registered method names, in registry order (the CLI's choices)."""
    return tuple(_METHODS)


def method_info(name: str) -> MethodInfo:
    """The registry entry of ``name``; an unknown name is refused with the choices."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise InvalidOption(
            f"method: unknown method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def load_method(name: str) -> ModuleType:
    """The module of method ``name`` (imports torch)."""
    return importlib.import_module(f"scalecert.methods.{method_info(name).name}")


def describe_methods() -> list[str]:
    """One line per method: name, guarantee, summary."""
    width = max(len(name) for name in _METHODS)
    return [f"{info.name:<{width}}  {info.guarantee:<9}  {info.summary}"
            for info in _METHODS.values()]
