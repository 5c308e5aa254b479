"""Classifiers that split into a superficial stem f and the rest g, and their checkpoints."""

from scalecert.models.base import Normalize, Split, StagedClassifier
from scalecert.models.registry import (
    available_models,
    create_model,
    file_sha256,
    load_model,
    save_checkpoint,
)

__all__ = [
    "Normalize",
    "Split",
    "StagedClassifier",
    "available_models",
    "create_model",
    "file_sha256",
    "load_model",
    "save_checkpoint",
]
