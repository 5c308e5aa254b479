"""Classifiers that split into a superficial stem f and the rest g, and their checkpoints;
``load_model`` is the one front door for every ``--model`` spec."""

from scalecert.models.base import Normalize, Split, StagedClassifier
from scalecert.models.preprocessing import Preprocessing
from scalecert.models.registry import (
    available_models,
    builtin_preprocessing,
    check_preprocessing,
    create_model,
    file_sha256,
    load_model,
    save_checkpoint,
)
from scalecert.models.spec import ModelSpec, parse_spec

__all__ = [
    "ModelSpec",
    "Normalize",
    "Preprocessing",
    "Split",
    "StagedClassifier",
    "available_models",
    "builtin_preprocessing",
    "check_preprocessing",
    "create_model",
    "file_sha256",
    "load_model",
    "parse_spec",
    "save_checkpoint",
]
