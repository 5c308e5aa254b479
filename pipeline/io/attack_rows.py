"""Attack rows and their Parquet files (``scalecert attack``).

Long format: one row per image x attack x patch size x method, in ``<out>/attacks/``. Each row
holds what the attack did to the image (the undefended model's and the defended model's
prediction on the attacked image, the defense's output, its alert box) and the clean image's
certificate from the same run with the same options, so every row can be audited: a certified
image whose attacked version ends in neither its label nor ALERT is a soundness violation.
An image that could not be attacked still gets its rows, with ``status = "error"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline.io.certificates import (
    HEAD,
    PartFiles,
    RowContext,
    as_floats,
    as_list,
    error_head,
    head_columns,
    negative_as_null,
    rows_table,
)

ATTACK_SCHEMA = pa.schema([
    *HEAD,
    ("attack", pa.string()),  # a name of scalecert.attack_registry
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


ATTACK_ROWS = PartFiles("attacks", ATTACK_SCHEMA, ("image_id", "attack", "patch_px", "method"))


def attack_part_location(out: str, shard: int) -> str:
    """Where shard ``shard`` of the attack run in ``out`` keeps its rows."""
    return ATTACK_ROWS.location(out, shard)


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
    return attack_rows_table({
        **error_head(context, image_id, label, reason, len(keys)),
        "attack": [attack for attack, _, _ in keys], "patch_px": [px for _, px, _ in keys],
        "method": [method for _, _, method in keys], "certified": [False] * len(keys),
    })


def covers(outer: list[int], inner: list[int]) -> bool:
    """Whether box ``outer`` contains box ``inner`` (top, left, bottom, right; ends exclusive)."""
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])


def attack_rows(
    context: RowContext,
    image_ids: Sequence[str],
    labels: Any,
    attack: Mapping[str, Any],
    method: str,
    patch_px: int,
    clean: Mapping[str, np.ndarray],
    attacked: Mapping[str, np.ndarray],
    attacked_vanilla: np.ndarray,
    detection: Mapping[str, np.ndarray],
    latency_ms: float,
) -> pa.Table:
    """The rows of one chunk for one (patch size, method), column by column, from numpy
    arrays (the worker converts the library's results at its boundary): ``attack`` the
    columns every row of the run shares (attack, attack_model, alpha, target); ``clean`` the
    clean images' ``CertifyResult``, ``attacked`` the ``AttackResult``'s boxes, loss and
    steps, ``attacked_vanilla`` the undefended model's predictions on the attacked images,
    ``detection`` the ``DetectResult`` on them; ``latency_ms`` the chunk's time so far per
    image (certification, attack and detection)."""
    n = len(image_ids)
    patch_boxes = as_list(attacked["boxes"])
    outputs = as_list(detection["output"])
    alert_boxes = negative_as_null(detection["alert_box"])
    localized = [None if output != ALERT else (box is not None and covers(box, patch))
                 for output, box, patch in zip(outputs, alert_boxes, patch_boxes)]
    return attack_rows_table({
        **head_columns(context, image_ids, labels),
        **{name: [attack[name]] * n for name in ("attack", "attack_model", "alpha", "target")},
        "method": [method] * n, "patch_px": [patch_px] * n, "patch_box": patch_boxes,
        "vanilla_prediction": as_list(clean["vanilla_prediction"]),
        "prediction": as_list(clean["prediction"]), "certified": as_list(clean["certified"]),
        "attacked_vanilla_prediction": as_list(attacked_vanilla),
        "attacked_prediction": as_list(detection["prediction"]),
        "detect_output": outputs, "alert_box": alert_boxes, "localized": localized,
        "recovered_prediction": negative_as_null(detection["recovered_prediction"]),
        "attack_loss": as_floats(attacked["loss"]),
        "attack_steps": as_list(attacked["steps"]),
        "latency_ms": [latency_ms] * n,
    })


def is_violation(certified: bool | None, label: int, detect_output: int | None) -> bool:
    """The audit's test: a certified image whose attacked version ends in neither its label
    nor ALERT breaks the detection theorem."""
    return bool(certified) and detect_output is not None and detect_output not in (label, ALERT)
