"""Models loaded from a storage location (local or s3://), for the certify workers and
fine-tuning alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.io import storage
from scalecert.models import StagedClassifier, load_model


def load_stored_model(
    name: str, checkpoint: str | None, s3: storage.S3Options, expect_sha256: str | None = None
) -> StagedClassifier:
    """Model ``name`` with ``checkpoint`` loaded (an ``s3://`` checkpoint is downloaded to a
    temporary file first). ``model.checkpoint_sha256`` fingerprints the weights.

    ``expect_sha256``: the checkpoint's sha256 when the run was planned. A worker passes it, so
    that a checkpoint rewritten since (``s3://models/latest.pt`` under a training job) raises
    :class:`~scalecert.errors.ModelChanged` instead of being certified under the planned
    fingerprint."""
    if checkpoint is None or not storage.is_s3(checkpoint):
        return load_model(name, checkpoint=checkpoint, expect_sha256=expect_sha256)
    with tempfile.TemporaryDirectory(prefix="scalecert-ckpt-") as folder:
        path = Path(folder) / Path(checkpoint).name
        path.write_bytes(storage.read_bytes(checkpoint, s3))
        return load_model(name, checkpoint=path, expect_sha256=expect_sha256, location=checkpoint)
