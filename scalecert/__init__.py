"""ScaleCert: certified patch detection with sparse superficial layers, as a library.

The paper's three stages live in three modules: :mod:`scalecert.sin` (SIN pruning),
:mod:`scalecert.occlusion` (occluding prediction F(x, m)) and :mod:`scalecert.certify`
(detection and certification). This package imports torch only: no Ray, S3 or Parquet.
"""

from scalecert.certify import ALERT, Certifier, CertifyResult, DetectResult
from scalecert.config import CertConfig
from scalecert.masks import MaskFamily
from scalecert.models import available_models, create_model, load_model

__version__ = "0.1.0"

__all__ = [
    "ALERT",
    "CertConfig",
    "Certifier",
    "CertifyResult",
    "DetectResult",
    "MaskFamily",
    "available_models",
    "create_model",
    "load_model",
    "__version__",
]
