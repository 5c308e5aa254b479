"""CertConfig validation: bad values are refused with the field named."""

from __future__ import annotations

import json

import pytest

from scalecert import CertConfig


@pytest.mark.parametrize(("values", "field"), [
    ({"patch_px": 0}, "patch_px"),
    ({"patch_px": 2.5}, "patch_px"),
    ({"patch_px": 5, "top_k": 0.0}, "top_k"),
    ({"patch_px": 5, "top_k": 1.5}, "top_k"),
    ({"patch_px": 5, "top_k": "0.1"}, "top_k"),
    ({"patch_px": 5, "r": 0}, "r"),
    ({"patch_px": 5, "masks_per_axis": 6, "mask_stride": 3}, "mask_stride"),
    ({"patch_px": 5, "masks_per_axis": 1, "r": 2}, "masks_per_axis"),
    ({"patch_px": 5, "mask_stride": 0}, "mask_stride"),
    ({"patch_px": 5, "method": "patchguard"}, "method"),
    ({"patch_px": 5, "margin": 0.0}, "margin"),
    ({"patch_px": 5, "margin": float("nan")}, "margin"),
    ({"patch_px": 5, "occlusion_value": 2.0}, "occlusion_value"),
    ({"patch_px": 5, "layer": ""}, "layer"),
])
def test_invalid_values_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CertConfig(**values)


def test_defaults_and_json_round_trip() -> None:
    config = CertConfig(patch_px=5)
    assert config.masks_per_axis == 6 and config.mask_stride is None
    assert config.method == "scalecert" and config.r == 1
    loaded = CertConfig.from_dict(json.loads(config.to_json()))
    assert loaded == config
    assert config.to_json() == CertConfig(patch_px=5, masks_per_axis=6).to_json()


def test_stride_instead_of_masks_per_axis() -> None:
    config = CertConfig(patch_px=5, mask_stride=4)
    assert config.masks_per_axis is None and config.mask_stride == 4


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="topk"):
        CertConfig.from_dict({"patch_px": 5, "topk": 0.1})
