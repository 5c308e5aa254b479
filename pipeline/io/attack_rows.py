"""Attack rows and their Parquet files (``scalecert attack``).

Long format: one row per image x attack x patch size x method, in ``<out>/attacks/``. Each row
holds what the attack did to the image (the undefended model's and the defended model's
prediction on the attacked image, the defense's output, its alert box) and the clean image's
certificate from the same run with the same options, so every row can be audited: a certified
image whose attacked version ends in neither its label nor ALERT is a soundness violation.
An image that could not be attacked still gets its rows, with ``status = "error"``.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

from pipeline.io import storage
from pipeline.io.certificates import RowContext, rows_table

ATTACK_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("shard", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("attack", pa.string()),  # per-image | universal | adaptive | detector
    ("attack_model", pa.string()),  # the model the attack optimised against: undefended | defended
    ("method", pa.string()),
    ("patch_px", pa.int64()),
    ("alpha", pa.float64()),  # adaptive: weight of the activation penalty (null otherwise)
    ("target", pa.int64()),  # targeted attacks: the class aimed at (null: untargeted)
    ("patch_box", pa.list_(pa.int64())),  # (top, left, bottom, right), ends exclusive
    ("vanilla_prediction", pa.int64()),  # the undefended model on the clean image
    ("prediction", pa.int64()),  # M(x), the defended model on the clean image
    ("certified", pa.bool_()),  # the clean image's certificate (same run, same options)
    ("attacked_vanilla_prediction", pa.int64()),  # the undefended model on the attacked image
    ("attacked_prediction", pa.int64()),  # M(x') on the attacked image
    ("detect_output", pa.int64()),  # detection on the attacked image: a label or -1 (ALERT)
    ("alert_box", pa.list_(pa.int64())),  # the located block of an alert (null: none)
    ("localized", pa.bool_()),  # alerts: the alert box covers the patch (null: no alert)
    ("recovered_prediction", pa.int64()),  # the prediction with the alert box occluded
    ("attack_loss", pa.float64()),  # the attack's final objective (higher: stronger)
    ("attack_steps", pa.int64()),  # optimisation steps spent on the image, restarts included
    ("latency_ms", pa.float64()),  # per-image share of the chunk's wall time
])

ALERT = -1


def attack_part_location(out: str, shard: int) -> str:
    """Where shard ``shard`` of the attack run in ``out`` keeps its rows."""
    return storage.join(out, "attacks", f"part-{shard:05d}.parquet")


def attack_rows_table(columns: dict[str, list[Any]]) -> pa.Table:
    """A block of attack rows given column-wise (names of :data:`ATTACK_SCHEMA`; absent ones
    are null)."""
    return rows_table(columns, ATTACK_SCHEMA)


def attack_table_from_dicts(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Attack rows given one dict each (tests, tools); absent keys are null."""
    rows = list(rows)
    return attack_rows_table({name: [row.get(name) for row in rows]
                              for name in ATTACK_SCHEMA.names})


def attack_error_rows(
    context: RowContext, image_id: str, label: int, reason: str,
    keys: Iterable[tuple[str, int, str]],
) -> pa.Table:
    """One ``status = "error"`` row per (attack, patch_px, method) of an image that could not
    be attacked."""
    keys = list(keys)
    n = len(keys)
    return attack_rows_table({
        "run_id": [context.run_id] * n, "image_id": [image_id] * n, "label": [label] * n,
        "shard": [context.shard] * n, "status": ["error"] * n, "error": [reason] * n,
        "attack": [attack for attack, _, _ in keys], "patch_px": [px for _, px, _ in keys],
        "method": [method for _, _, method in keys], "certified": [False] * n,
    })


def is_violation(certified: bool | None, label: int, detect_output: int | None) -> bool:
    """The audit's test: a certified image whose attacked version ends in neither its label
    nor ALERT breaks the detection theorem."""
    return bool(certified) and detect_output is not None and detect_output not in (label, ALERT)
