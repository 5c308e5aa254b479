"""ScaleCert: certified patch detection with sparse superficial layers, as a library.

The paper's stages: :mod:`scalecert.sin` (SIN pruning), the defenses in
:mod:`scalecert.methods` (one module each: its predictor F(x, m), its rule and certificate) and
:mod:`scalecert.certify` (the one front door that drives any method over batches of images). This package imports torch only: no Ray, S3 or Parquet.

The names below are loaded on first use, so that ``import scalecert`` (for its version, its
configuration or its errors) does not import torch: ``scalecert report`` reads Parquet only.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# exported name -> the module that defines it
_EXPORTS = {
    "ALERT": "scalecert.certify",
    "NOT_EVALUATED": "scalecert.certify",
    "Certifier": "scalecert.certify",
    "CertifierGroup": "scalecert.certify",
    "CertifyResult": "scalecert.certify",
    "DetectResult": "scalecert.certify",
    "certify_many": "scalecert.certify",
    "CertConfig": "scalecert.config",
    "FastPath": "scalecert.precision",
    "FinetuneConfig": "scalecert.training",
    "finetune": "scalecert.training",
    "MaskFamily": "scalecert.masks",
    "available_models": "scalecert.models",
    "create_model": "scalecert.models",
    "load_model": "scalecert.models",
    "ModelSpec": "scalecert.models",
    "Preprocessing": "scalecert.models",
    "parse_spec": "scalecert.models",
    "Refusal": "scalecert.errors",
    "InvalidOption": "scalecert.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scalecert' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
