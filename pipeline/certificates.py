"""Certificate rows and their Parquet files.

Long format: one row per image x patch size x method. An image that could not be certified
(undecodable, no label) still gets its rows, with ``status = "error"`` and the reason, so every
listed image is accounted for. The run's config, fingerprint and package version go into the
Parquet schema metadata as JSON under the key ``scalecert``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from scalecert import CertifyResult

METADATA_KEY = b"scalecert"

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("shard", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("method", pa.string()),
    ("patch_px", pa.int64()),
    ("prediction", pa.int64()),
    ("vanilla_prediction", pa.int64()),
    ("clean_output", pa.int64()),
    ("certified", pa.bool_()),
    ("n_masks", pa.int64()),
    ("n_evaluated", pa.int64()),
    ("min_margin", pa.float64()),
    ("alert_box", pa.list_(pa.int64())),
    ("recovered_prediction", pa.int64()),
    ("latency_ms", pa.float64()),
    ("mask_predictions", pa.list_(pa.int64())),  # per window, in family order (--full-map only)
])


@dataclass(frozen=True)
class RowContext:
    """What every row of one shard shares."""

    run_id: str
    shard: int


def certified_rows(
    context: RowContext,
    image_ids: list[str],
    labels: list[int],
    method: str,
    patch_px: int,
    result: CertifyResult,
    latency_ms: float,
    with_mask_map: bool = False,
) -> list[dict[str, Any]]:
    """Rows for images certified in one call (``latency_ms``: that call's time per image);
    ``with_mask_map`` adds each image's per-window predictions (audits, ``--full-map``)."""
    rows = []
    for i, image_id in enumerate(image_ids):
        box = [int(v) for v in result.alert_box[i].tolist()]
        recovered = int(result.recovered_prediction[i])
        rows.append({
            "run_id": context.run_id, "image_id": image_id, "label": int(labels[i]),
            "shard": context.shard, "status": "ok", "error": None, "method": method,
            "patch_px": patch_px, "prediction": int(result.prediction[i]),
            "vanilla_prediction": int(result.vanilla_prediction[i]),
            "clean_output": int(result.clean_output[i]), "certified": bool(result.certified[i]),
            "n_masks": int(result.n_masks[i]), "n_evaluated": int(result.n_evaluated[i]),
            "min_margin": float(result.min_margin[i]),
            "alert_box": box if box[0] >= 0 else None,
            "recovered_prediction": recovered if recovered >= 0 else None,
            "latency_ms": latency_ms,
            "mask_predictions": result.mask_predictions[i].tolist() if with_mask_map else None,
        })
    return rows


def error_rows(
    context: RowContext,
    image_id: str,
    label: int,
    reason: str,
    keys: Iterable[tuple[int, str]],
) -> list[dict[str, Any]]:
    """One ``status = "error"`` row per (patch_px, method) for an image that was not certified."""
    return [
        {
            "run_id": context.run_id, "image_id": image_id, "label": label,
            "shard": context.shard, "status": "error", "error": reason, "method": method,
            "patch_px": patch_px, "certified": False,
        }
        for patch_px, method in keys
    ]


def to_parquet_bytes(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> bytes:
    """Rows (sorted by image, patch, method) as Parquet bytes with the run metadata."""
    ordered = sorted(rows, key=lambda row: (row["image_id"], row["patch_px"], row["method"]))
    columns = {name: [row.get(name) for row in ordered] for name in SCHEMA.names}
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_metadata(location: str, s3: storage.S3Options | None = None) -> dict[str, Any]:
    """The run metadata stored in the certificate file at ``location`` (empty if none)."""
    filesystem, path = storage.resolve(location, s3)
    with filesystem.open_input_file(path) as source:
        raw = (pq.read_schema(source).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_table(location: str, s3: storage.S3Options | None = None) -> pa.Table:
    """The rows of the certificate file at ``location``.

    Read through pyarrow's own file objects, never from Python ``bytes``: pyarrow's I/O threads
    can release a Python-owned buffer while the interpreter exits, which aborts the process
    (seen at the end of `ray job submit` runs)."""
    filesystem, path = storage.resolve(location, s3)
    with filesystem.open_input_file(path) as source:
        return pq.read_table(source)
