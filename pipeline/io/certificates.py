"""Certificate rows and their Parquet files.

Long format: one row per image x patch size x method. An image that could not be certified
(undecodable, no label) still gets its rows, with ``status = "error"`` and the reason, so every
listed image is accounted for. The run's config, fingerprint and package version go into the
Parquet schema metadata as JSON under the key ``scalecert``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import faults, storage

METADATA_KEY = b"scalecert"

# The columns every row of every job begins with: certificate rows and attack rows alike
# (:func:`head_columns`, :func:`error_head`).
HEAD = (
    ("run_id", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("shard", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
)

SCHEMA = pa.schema([
    *HEAD,
    ("method", pa.string()),
    ("patch_px", pa.int64()),
    ("prediction", pa.int64()),
    ("vanilla_prediction", pa.int64()),
    ("clean_output", pa.int64()),
    ("certified", pa.bool_()),
    ("n_masks", pa.int64()),
    ("n_evaluated", pa.int64()),
    ("min_margin", pa.float64()),
    # detection methods: the least confidence of a window's prediction and the largest of a
    # window disagreeing with M(x), for certificates and alerts at any alert confidence TAU
    ("min_confidence", pa.float64()),
    ("max_alert_confidence", pa.float64()),
    ("alert_box", pa.list_(pa.int64())),
    ("recovered_prediction", pa.int64()),
    ("latency_ms", pa.float64()),
    ("mask_predictions", pa.list_(pa.int64())),  # per window, in family order (--full-map only)
])


# Column values from numpy arrays (or lists), for the row mappings of every job.
def as_list(values: Any) -> list[Any]:
    return np.asarray(values).tolist()


def as_floats(values: Any) -> list[float]:
    return np.asarray(values, dtype=np.float64).tolist()


def nan_as_null(values: Any) -> list[float | None]:
    """Floats, NaN (a figure the method does not have) as null."""
    return [None if math.isnan(value) else value for value in as_floats(values)]


def negative_as_null(values: Any) -> list[Any]:
    """Labels, or boxes by their first entry, with -1 (none) as null."""
    return [None if (value[0] if isinstance(value, list) else value) < 0 else value
            for value in as_list(values)]


# The columns taken from a certification result (``CertifyResult``, as numpy arrays): each from
# the result's field of the same name, turned into column values by its rule. A new column of
# this kind is its line in SCHEMA and its line here.
RESULT_COLUMNS: Mapping[str, Callable[[Any], list[Any]]] = MappingProxyType({
    "prediction": as_list,
    "vanilla_prediction": as_list,
    "clean_output": as_list,
    "certified": as_list,
    "n_masks": as_list,
    "n_evaluated": as_list,
    "min_margin": as_floats,
    "min_confidence": nan_as_null,  # NaN for recovery methods
    "max_alert_confidence": nan_as_null,
    "alert_box": negative_as_null,
    "recovered_prediction": negative_as_null,
})


@dataclass(frozen=True)
class RowContext:
    """What every row of one shard shares."""

    run_id: str
    shard: int


def head_columns(context: RowContext, image_ids: Sequence[str],
                 labels: Any) -> dict[str, list[Any]]:
    """The :data:`HEAD` columns of the ``ok`` rows of ``image_ids`` (``labels``: one each)."""
    n = len(image_ids)
    return {"run_id": [context.run_id] * n, "image_id": list(image_ids),
            "label": as_list(labels), "shard": [context.shard] * n, "status": ["ok"] * n,
            "error": [None] * n}


def error_head(context: RowContext, image_id: str, label: int, reason: str,
               n: int) -> dict[str, list[Any]]:
    """The :data:`HEAD` columns of ``n`` ``status = "error"`` rows of one image."""
    return {"run_id": [context.run_id] * n, "image_id": [image_id] * n, "label": [label] * n,
            "shard": [context.shard] * n, "status": ["error"] * n, "error": [reason] * n}


def certificate_rows(
    context: RowContext,
    image_ids: Sequence[str],
    labels: Any,
    method: str,
    patch_px: int,
    result: Mapping[str, np.ndarray],
    latency_ms: float,
    with_mask_map: bool = False,
) -> pa.Table:
    """The rows of images certified in one call, column by column: each of
    :data:`RESULT_COLUMNS` from the result's field of that name (numpy arrays; the worker
    converts a ``CertifyResult`` at its boundary), ``latency_ms`` that call's time per image;
    ``with_mask_map`` adds each image's per-window predictions (audits, ``--full-map``)."""
    n = len(image_ids)
    return rows_table({
        **head_columns(context, image_ids, labels),
        "method": [method] * n, "patch_px": [patch_px] * n,
        **{name: convert(result[name]) for name, convert in RESULT_COLUMNS.items()},
        "latency_ms": [latency_ms] * n,
        "mask_predictions": as_list(result["mask_predictions"]) if with_mask_map else [None] * n,
    })


@dataclass(frozen=True)
class PartFiles:
    """How a job keeps its rows: one Parquet file per shard in ``<out>/<folder>/``, rows of
    ``schema`` sorted by ``sort_keys`` (certificates: :data:`CERTIFICATES`; attack rows:
    ``pipeline.io.attack_rows.ATTACK_ROWS``)."""

    folder: str
    schema: pa.Schema
    sort_keys: tuple[str, ...]

    def location(self, out: str, shard: int) -> str:
        """Where shard ``shard`` of the run in ``out`` keeps its rows."""
        return storage.join(out, self.folder, f"part-{shard:05d}.parquet")

    def parquet_bytes(self, blocks: Iterable[pa.Table], metadata: dict[str, Any]) -> bytes:
        """A shard's blocks of rows as its Parquet file (:func:`to_parquet_bytes`)."""
        return to_parquet_bytes(blocks, metadata, self.schema, self.sort_keys)


CERTIFICATES = PartFiles("certificates", SCHEMA, ("image_id", "patch_px", "method"))


def part_location(out: str, shard: int) -> str:
    """Where shard ``shard`` of the run in ``out`` keeps its certificates."""
    return CERTIFICATES.location(out, shard)


def rows_table(columns: dict[str, list[Any]], schema: pa.Schema = SCHEMA) -> pa.Table:
    """A block of rows given column-wise (names of ``schema``, the certificates' by default;
    absent ones are null)."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"rows_table: columns of different lengths {sorted(lengths)}")
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(f"rows_table: unknown column(s) {', '.join(unknown)}")
    n = lengths.pop() if lengths else 0
    return pa.Table.from_pydict(
        {name: columns.get(name, [None] * n) for name in schema.names}, schema=schema)


def table_from_dicts(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows given one dict each (hand-made rows: tests, tools); absent keys are null."""
    rows = list(rows)
    return rows_table({name: [row.get(name) for row in rows] for name in SCHEMA.names})


def error_rows(
    context: RowContext,
    image_id: str,
    label: int,
    reason: str,
    keys: Iterable[tuple[int, str]],
) -> pa.Table:
    """One ``status = "error"`` row per (patch_px, method) for an image that was not certified."""
    keys = list(keys)
    return rows_table({
        **error_head(context, image_id, label, reason, len(keys)),
        "method": [method for _, method in keys], "patch_px": [px for px, _ in keys],
        "certified": [False] * len(keys),
    })


def to_parquet_bytes(
    blocks: Iterable[pa.Table], metadata: dict[str, Any], schema: pa.Schema = SCHEMA,
    sort_keys: tuple[str, ...] = ("image_id", "patch_px", "method"),
) -> bytes:
    """Blocks of rows of ``schema`` (from :func:`rows_table`, or attack rows), sorted by
    ``sort_keys``, as Parquet bytes with the run metadata."""
    blocks = list(blocks)
    table = pa.concat_tables(blocks) if blocks else schema.empty_table()
    table = table.sort_by([(key, "ascending") for key in sort_keys])
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_metadata(location: str, s3: storage.S3Options | None = None) -> dict[str, Any]:
    """The run metadata stored in the certificate file at ``location`` (empty if none)."""
    filesystem, path = storage.resolve(location, s3)
    with faults.at(location), filesystem.open_input_file(path) as source:
        return _metadata(pq.read_schema(source))


def table_metadata(table: pa.Table) -> dict[str, Any]:
    """The run metadata of a table :func:`read_table` read (empty if none)."""
    return _metadata(table.schema)


def _metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_parts(locations: Sequence[str],
               s3: storage.S3Options | None = None) -> Iterator[pa.Table | None]:
    """The rows of the part file at each of ``locations`` (certificates or attack rows, with
    their metadata), in order; None where there is no file. Read ahead in threads (on S3 each
    file is a round trip or two, and 50,000 images make ~200 of them); a file that cannot be
    read raises when its turn comes, so the caller checks the files in order."""

    def read(location: str) -> pa.Table | None:
        return read_table(location, s3) if storage.exists(location, s3) else None

    pool = ThreadPoolExecutor(max_workers=16)
    try:
        yield from pool.map(read, locations)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_table(location: str, s3: storage.S3Options | None = None) -> pa.Table:
    """The rows of the certificate file at ``location``.

    Read through pyarrow's own file objects, never from Python ``bytes``: pyarrow's I/O threads
    can release a Python-owned buffer while the interpreter exits, which aborts the process
    (seen at the end of `ray job submit` runs)."""
    filesystem, path = storage.resolve(location, s3)
    with faults.at(location), filesystem.open_input_file(path) as source:
        return pq.read_table(source)
