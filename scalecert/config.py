"""Certification configuration: validated once, frozen, serialisable for run fingerprints."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from scalecert.errors import InvalidOption
from scalecert.methods.registry import method_info

DEFAULT_MASKS_PER_AXIS = 6
VOTES = ("unanimous", "majority")
# where the mask windows of an axis lie (scalecert.masks): "clipped" ends the last window at the
# image's edge; "patchcleanser" shifts it inward at full size, as the reference PatchCleanser does
WINDOW_LAYOUTS = ("clipped", "patchcleanser")
DEFAULT_WINDOW_LAYOUT = "clipped"


@dataclass(frozen=True)
class CertConfig:
    """What to certify and how.

    patch_px: side of the square adversarial patch, in pixels of the preprocessed image.
    top_k: fraction of superficial-layer positions kept by SIN pruning, in (0, 1].
    masks_per_axis / mask_stride: the mask grid, given either way (not both); neither means
        6 masks per axis. With masks_per_axis the stride is the smallest that covers the image.
    r: coverage; every patch position lies inside an r x r block of masks.
    method: a registered method (:mod:`scalecert.methods.registry`; ``scalecert methods``
        lists them with their guarantees).
    layer: superficial layer to split at (None: the model's default, after the first ReLU).
    margin: every computed prediction must beat its runner-up logit by this much to count
        towards a certificate, so float differences between batch compositions cannot flip it.
    occlusion_value: pixel value written into masked windows by the `masking` method.
    alert_confidence: TAU in (0, 1), or None (default: any disagreeing window alerts). With
        TAU, detection alerts only when a window predicts a label other than M(z) with softmax
        confidence >= TAU, and certified(x, y) also needs every window to predict y with
        confidence >= TAU + margin / 2 (the slack covers the float noise the logit margin
        covers). Detection methods with r = 1 only.
    vote: "unanimous" (default: Algorithm 1's rules) or "majority" (r >= 2, detection
        methods): detection alerts unless the strict majority of every r x r block of windows
        is M(z); certified(x, y) needs M(x) = y and, in every block, a strict majority of
        windows predicting y with the margin.
    window_layout: "clipped" (default: windows of side p + r*s - 1, the last ones clipped to
        the image) or "patchcleanser" (r = 1: the reference PatchCleanser's layout, the last
        window shifted inward at full size; published PatchCleanser and Minority Reports
        figures use it). Both cover every patch position (docs/DESIGN-NOTES.md). It enters
        the dict and the fingerprint only when not the default, so earlier runs keep theirs.
    """

    patch_px: int
    top_k: float = 0.15
    masks_per_axis: int | None = None
    mask_stride: int | None = None
    r: int = 1
    method: str = "scalecert"
    layer: str | None = None
    margin: float = 1e-3
    occlusion_value: float = 0.0
    alert_confidence: float | None = None
    vote: str = "unanimous"
    window_layout: str = DEFAULT_WINDOW_LAYOUT

    def __post_init__(self) -> None:
        _check_int("patch_px", self.patch_px, minimum=1)
        _check_int("r", self.r, minimum=1)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, float)):
            raise InvalidOption(f"top_k: must be a number in (0, 1], got {self.top_k!r}")
        if not (0.0 < float(self.top_k) <= 1.0):
            raise InvalidOption(f"top_k: must be in (0, 1], got {self.top_k!r}")
        if self.masks_per_axis is not None and self.mask_stride is not None:
            raise InvalidOption(
                "masks_per_axis, mask_stride: give one of them, not both "
                f"(got masks_per_axis={self.masks_per_axis}, mask_stride={self.mask_stride})"
            )
        if self.masks_per_axis is None and self.mask_stride is None:
            object.__setattr__(self, "masks_per_axis", DEFAULT_MASKS_PER_AXIS)
        if self.masks_per_axis is not None:
            _check_int("masks_per_axis", self.masks_per_axis, minimum=self.r)
        if self.mask_stride is not None:
            _check_int("mask_stride", self.mask_stride, minimum=1)
        # an unknown method is refused with the registered ones, a family it cannot use too
        method_info(self.method).check_family(self.r, self.masks_per_axis, self.mask_stride)
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise InvalidOption(f"layer: must be a layer name or None, got {self.layer!r}")
        if not _finite_number(self.margin) or self.margin <= 0:
            raise InvalidOption(f"margin: must be a finite number > 0, got {self.margin!r}")
        if not _finite_number(self.occlusion_value) or not 0.0 <= self.occlusion_value <= 1.0:
            raise InvalidOption(
                f"occlusion_value: must be a pixel value in [0, 1], got {self.occlusion_value!r}"
            )
        if self.alert_confidence is not None:
            tau = self.alert_confidence
            if not _finite_number(tau) or not 0.0 < tau < 1.0:
                raise InvalidOption(f"alert_confidence: must be a number in (0, 1), got {tau!r}")
            if method_info(self.method).guarantee != "detection":
                raise InvalidOption(
                    f"alert_confidence: method {self.method} never alerts (certified recovery)")
            if self.r != 1:
                raise InvalidOption(f"alert_confidence: needs r = 1, got r = {self.r}")
        if self.vote not in VOTES:
            raise InvalidOption(f"vote: one of {', '.join(VOTES)}, got {self.vote!r}")
        if self.vote == "majority":
            if method_info(self.method).guarantee != "detection":
                raise InvalidOption(
                    f"vote: majority is a detection rule; method {self.method} certifies recovery")
            if self.r < 2:
                raise InvalidOption("vote: majority needs r >= 2 (a block of r x r windows "
                                    f"votes), got r = {self.r}")
        if self.window_layout not in WINDOW_LAYOUTS:
            raise InvalidOption(f"window_layout: one of {', '.join(WINDOW_LAYOUTS)}, "
                                f"got {self.window_layout!r}")
        if self.window_layout == "patchcleanser" and self.r != 1:
            raise InvalidOption(f"window_layout: patchcleanser needs r = 1, got r = {self.r}")

    @property
    def certificate_confidence(self) -> float | None:
        """The confidence every window needs for a certificate: TAU + margin / 2 (None without
        TAU). A logit error below ``margin`` moves a softmax probability by less than
        margin / 2, so a window at this confidence on x stays >= TAU wherever it runs."""
        if self.alert_confidence is None:
            return None
        return self.alert_confidence + self.margin / 2

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        # the default layout is left out, so configs (and fingerprints) from before it existed
        # are unchanged; from_dict fills it back in
        if values["window_layout"] == DEFAULT_WINDOW_LAYOUT:
            del values["window_layout"]
        return values

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): stable input for run fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CertConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidOption(f"unknown CertConfig field(s): {', '.join(unknown)}")
        return cls(**values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidOption(f"{name}: must be >= {minimum}, got {value}")


def _finite_number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    )
