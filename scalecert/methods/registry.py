"""Method names -> what each method is, without importing torch (options, the CLI and the
report validate and list methods through this); :func:`load_method` imports a method's module.

One immutable mapping, like the model registry. Method ``name`` lives in the module
``scalecert.methods.<name>``, which defines ``build(model, config)`` (the
:class:`~scalecert.methods.base.Method` a :class:`~scalecert.certify.Certifier` drives: its
predictor, what it prepares and shares, its rule and certificate), ``predictor(model, config)``
(F(x, m), which attacks and audits use) and ``defended_logits(model, config, images, windows)``
(the forward pass fine-tuning trains). Adding a method is its module and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, ModuleType

from scalecert.errors import InvalidOption

# detection: a certified image is labelled right or ALERT under any patch (the defense may
# alert); recovery: a certified image is labelled right under any patch (it never alerts)
GUARANTEES = ("detection", "recovery")
MAX_RECOVERY_MASKS_PER_AXIS = 10  # 100 windows, 4,950 pairs: double masking's cost is quadratic


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, the guarantee its certificates give, and one line on what
    it does (``scalecert methods`` prints it)."""

    name: str
    guarantee: str
    summary: str
    # whether M is the SIN-pruned model: then the model is split at the layer and the
    # undefended model is computed apart (the plan checks the layer before any image is read)
    pruned: bool

    def __post_init__(self) -> None:
        if self.guarantee not in GUARANTEES:
            raise InvalidOption(f"guarantee: one of {GUARANTEES}, got {self.guarantee!r}")

    @property
    def limits(self) -> str:
        """The window families the method accepts, in words (``scalecert methods``)."""
        if self.guarantee == "recovery":
            return (f"r = 1; masks_per_axis 2 to {MAX_RECOVERY_MASKS_PER_AXIS} (every pair of "
                    "windows runs: n^2/2 per image); no mask_stride")
        return "any r, masks_per_axis or mask_stride"

    def check_family(self, r: int, masks_per_axis: int | None, mask_stride: int | None) -> None:
        """Refuse a window family the method cannot certify with (recovery: PatchCleanser's
        argument needs one window covering the patch, r = 1, and runs every pair of windows,
        so their number is bounded and must be known before any image is read)."""
        if self.guarantee != "recovery":
            return
        where = f"method {self.name}"
        if r != 1:
            raise InvalidOption(f"r: {where} needs r = 1 (one window covers the patch), got {r}")
        if mask_stride is not None:
            raise InvalidOption(
                f"mask_stride: {where} takes masks_per_axis, not mask_stride (its pair count "
                "must be known before the image size is)")
        if masks_per_axis is None or not 2 <= masks_per_axis <= MAX_RECOVERY_MASKS_PER_AXIS:
            count = "?" if masks_per_axis is None else masks_per_axis ** 2
            raise InvalidOption(
                f"masks_per_axis: {where} takes 2 to {MAX_RECOVERY_MASKS_PER_AXIS} masks per "
                f"axis (at most {MAX_RECOVERY_MASKS_PER_AXIS ** 2} windows, "
                f"{MAX_RECOVERY_MASKS_PER_AXIS ** 2 * (MAX_RECOVERY_MASKS_PER_AXIS ** 2 - 1) // 2}"
                f" pairs per image), got {masks_per_axis} ({count} windows)")


_METHODS: Mapping[str, MethodInfo] = MappingProxyType({
    "scalecert": MethodInfo(
        name="scalecert", pruned=True, guarantee="detection",
        summary="ScaleCert: SIN-pruned model, windows removed from the superficial features; "
                "windows that miss the kept positions need no run"),
    "masking": MethodInfo(
        name="masking", pruned=False, guarantee="detection",
        summary="Minority Reports certified detection: the unpruned model on images with each "
                "window's pixels occluded"),
    "patchcleanser": MethodInfo(
        name="patchcleanser", pruned=False, guarantee="recovery",
        summary="PatchCleanser double masking (certified recovery): the unpruned model on "
                "images with one, then two windows' pixels occluded"),
    "patchcleanser_sin": MethodInfo(
        name="patchcleanser_sin", pruned=True, guarantee="recovery",
        summary="double masking on the SIN-pruned model: one or two windows' footprints "
                "removed from the superficial features; pairs that miss the kept positions "
                "need no run"),
    "patchcleanser_challenger": MethodInfo(
        name="patchcleanser_challenger", pruned=False, guarantee="recovery",
        summary="PatchCleanser challenger masking (certified recovery): double masking's "
                "certificate; the recovered label from a game of window pairs (at most n - 1)"),
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
    return [f"{info.name:<{width}}  {info.guarantee:<9}  {info.summary} [{info.limits}]"
            for info in _METHODS.values()]
