"""Models loaded from a storage location (local or s3://), for the certify workers and
fine-tuning alike."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.io import storage
from scalecert.errors import InvalidOption
from scalecert.models import Preprocessing, check_preprocessing, load_model, parse_spec

# The options (and YAML keys) that declare a model's preprocessing, in every job's config.
PREPROCESSING_OPTIONS = ("input_size", "resize", "interpolation", "mean", "std")


def check_model_options(config: Any) -> Preprocessing:
    """Validate a job config's ``model`` spec and declared preprocessing before any work (no
    import, no file read), naming the flag at fault; ``mean`` and ``std`` become tuples of
    floats on the (frozen) config. Returns the declared :class:`Preprocessing`."""
    try:
        parse_spec(config.model)
        declared = declared_preprocessing(config)
        check_preprocessing(config.model, declared)
    except InvalidOption as exc:
        raise InvalidOption(as_flag_message(exc)) from None
    for name in ("mean", "std"):
        object.__setattr__(config, name, getattr(declared, name))
    return declared


def declared_preprocessing(config: Any) -> Preprocessing:
    """The preprocessing a job config declares (validated by :func:`check_model_options`)."""
    return Preprocessing(**{name: getattr(config, name) for name in PREPROCESSING_OPTIONS})


def model_fingerprint_fields(spec: str, model: nn.Module) -> dict[str, Any]:
    """What a loaded model adds to a run's fingerprint beyond the options and the checkpoint:
    the sha256 of its file or program, the versions of the packages it was imported from, and
    a user model's resolved preprocessing (timm's defaults can change with its version). Only
    the fields that are set: a built-in's runs keep the fingerprints of earlier versions."""
    fields: dict[str, Any] = {}
    if model.source_sha256 is not None:
        fields["source_sha256"] = model.source_sha256
    if model.package_versions:
        fields["package_versions"] = dict(sorted(model.package_versions.items()))
    if not parse_spec(spec).is_builtin:
        fields["preprocessing"] = model.preprocessing.declared()
    return fields


def load_stored_model(
    spec: str, checkpoint: str | None, s3: storage.S3Options, expect_sha256: str | None = None,
    *, preprocessing: Preprocessing | None = None, num_classes: int | None = None,
    expect_source_sha256: str | None = None,
    expect_package_versions: Mapping[str, str | None] | None = None,
) -> nn.Module:
    """The model of ``spec`` (any ``--model`` form) with ``checkpoint`` loaded and
    ``preprocessing`` declared (:func:`scalecert.models.load_model`). An ``s3://``
    checkpoint or ``export:s3://`` program is downloaded to a temporary file first;
    ``model.checkpoint_sha256``, ``model.source_sha256`` and ``model.package_versions``
    fingerprint what was loaded.

    ``expect_*``: what the run was planned with. A worker passes them, so that a checkpoint,
    model file or program rewritten since (``s3://models/latest.pt`` under a training job) or
    another package version raises :class:`~scalecert.errors.ModelChanged` instead of being
    certified under the planned fingerprint."""
    parsed = parse_spec(spec)
    check_preprocessing(parsed, preprocessing)  # before anything is downloaded
    with tempfile.TemporaryDirectory(prefix="scalecert-model-") as folder:
        local_checkpoint: str | Path | None = checkpoint
        if checkpoint is not None and storage.is_s3(checkpoint):
            local_checkpoint = _download(checkpoint, Path(folder) / "checkpoint", s3, "checkpoint")
        source_path = None
        if parsed.path is not None and storage.is_s3(parsed.path):
            source_path = _download(parsed.path, Path(folder) / "program", s3, "model")
        return load_model(
            parsed, checkpoint=local_checkpoint, num_classes=num_classes,
            preprocessing=preprocessing, expect_sha256=expect_sha256,
            location=checkpoint if local_checkpoint != checkpoint else None,
            expect_source_sha256=expect_source_sha256,
            expect_package_versions=expect_package_versions,
            source_path=source_path, source_location=parsed.path if source_path else None)


def _download(location: str, folder: Path, s3: storage.S3Options, what: str) -> Path:
    """``location`` copied into ``folder`` under its own name; a missing one is refused as
    ``what`` (``checkpoint: ...``, ``model: ...``)."""
    folder.mkdir()
    path = folder / Path(location).name
    try:
        path.write_bytes(storage.read_bytes(location, s3))
    except FileNotFoundError as exc:
        raise type(exc)(f"{what}: {exc}") from None
    except IsADirectoryError as exc:
        raise InvalidOption(f"{what}: {exc}") from None
    return path


_FIELDS = ("model", "checkpoint", "layer", "input_size", "resize", "interpolation", "mean",
           "std", "num_classes")


def as_flag_message(exc: Exception, default_flag: str = "--model") -> str:
    """A library refusal's text led by the flag it is about: ``model: ...`` becomes
    ``--model: ...``, ``layer relu_3: ...`` becomes ``--layer: layer relu_3: ...``;
    ``default_flag`` leads a text that names no field."""
    text = str(exc)
    name, colon, rest = text.partition(":")
    if colon and name in _FIELDS:
        return f"--{name.replace('_', '-')}:{rest}"
    first = text.split(" ", 1)[0]
    if first in _FIELDS:
        return f"--{first.replace('_', '-')}: {text}"
    return f"{default_flag}: {text}"
