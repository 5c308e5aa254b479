"""The attack shard worker: certifies each clean image, attacks it, runs the defense on the
attacked image, and writes one attack row per (image, patch size, method).

It is the certify worker (:class:`~pipeline.run.worker.ShardWorker`: model loaded once,
decoding a chunk ahead, atomic Parquet per shard) with its own chunk step, rows and folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.io.attack_rows import (
    ATTACK_SCHEMA,
    attack_error_rows,
    attack_part_location,
    attack_rows_table,
)
from pipeline.io.certificates import RowContext, to_parquet_bytes
from pipeline.io.sources import ImageRecord
from pipeline.run.attack_config import AttackOptions
from pipeline.run.worker import ShardWorker, WorkerSettings
from scalecert.attacks import AttackResult, attack_images
from scalecert.certify import CertifyResult, DetectResult

ALERT = -1


@dataclass(frozen=True)
class AttackSettings:
    """What an attack worker needs besides the certify worker's settings: the options and,
    for ``--attack universal``, the trained patch of each (patch size, method)."""

    options: AttackOptions
    universal_patches: dict[str, Any]  # universal_key(px, method) -> C x p x p nested lists


def universal_key(patch_px: int, method: str) -> str:
    return f"{patch_px}px/{method}"


class AttackShardWorker(ShardWorker):
    """Attacks shards with one model held in memory."""

    def __init__(self, settings: WorkerSettings, attack: AttackSettings) -> None:
        self.attack = attack
        super().__init__(settings)

    def _location(self, shard: int) -> str:
        return attack_part_location(self.settings.run.out, shard)

    def _error_rows(self, context: RowContext, record: ImageRecord, reason: str) -> pa.Table:
        keys = [(self.attack.options.attack, px, method) for px, method in self.keys]
        return attack_error_rows(context, record.image_id, record.label, reason, keys)

    def _parquet_bytes(self, blocks: list[pa.Table], metadata: dict[str, Any]) -> bytes:
        return to_parquet_bytes(blocks, metadata, ATTACK_SCHEMA,
                                ("image_id", "attack", "patch_px", "method"))

    def _certify_chunk(
        self,
        context: RowContext,
        chunk: list[tuple[ImageRecord, np.ndarray]],
        certified: dict[str, int],
    ) -> list[pa.Table]:
        began = time.perf_counter()
        ids, labels, images = self._batch(chunk)
        outcomes = self.certifiers.certify(images, labels)
        options = self.attack.options
        blocks = []
        for (patch_px, method), outcome, certifier in zip(self.keys, outcomes,
                                                          self.certifiers.certifiers):
            certified[f"{patch_px}px/{method}"] += int(outcome.result.certified.sum())
            patch = self.attack.universal_patches.get(universal_key(patch_px, method))
            attacked = attack_images(
                self.model, certifier.config, images, labels, options.attack_config(patch_px),
                attack_model=options.attack_model,
                universal_patch=None if patch is None else torch.tensor(patch).to(images))
            with torch.no_grad():
                attacked_vanilla = self.model(attacked.images).argmax(dim=1).cpu()
            detection = certifier.detect(attacked.images)
            blocks.append(attack_rows(
                context, ids, labels, options, method, patch_px, outcome.result, attacked,
                attacked_vanilla, detection,
                latency_ms=1000.0 * (time.perf_counter() - began) / len(chunk)))
        return blocks


def covers(outer: list[int], inner: list[int]) -> bool:
    """Whether box ``outer`` contains box ``inner`` (top, left, bottom, right; ends exclusive)."""
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])


def attack_rows(
    context: RowContext,
    image_ids: list[str],
    labels: torch.Tensor,
    options: AttackOptions,
    method: str,
    patch_px: int,
    clean: CertifyResult,
    attacked: AttackResult,
    attacked_vanilla: torch.Tensor,
    detection: DetectResult,
    latency_ms: float,
) -> pa.Table:
    """The rows of one chunk for one (patch size, method), column by column. ``latency_ms``:
    the chunk's time so far per image (certification, attack and detection)."""
    n = len(image_ids)
    patch_boxes = attacked.boxes.tolist()
    outputs = detection.output.tolist()
    alert_boxes = [box if box[0] >= 0 else None for box in detection.alert_box.tolist()]
    recovered = detection.recovered_prediction.tolist()
    localized = [None if output != ALERT else (box is not None and covers(box, patch))
                 for output, box, patch in zip(outputs, alert_boxes, patch_boxes)]
    return attack_rows_table({
        "run_id": [context.run_id] * n, "image_id": list(image_ids),
        "label": labels.tolist(), "shard": [context.shard] * n, "status": ["ok"] * n,
        "error": [None] * n, "attack": [options.attack] * n,
        "attack_model": [options.attack_model] * n, "method": [method] * n,
        "patch_px": [patch_px] * n,
        "alpha": [options.alpha if options.attack == "adaptive" else None] * n,
        "target": [options.target] * n, "patch_box": patch_boxes,
        "vanilla_prediction": clean.vanilla_prediction.tolist(),
        "prediction": clean.prediction.tolist(), "certified": clean.certified.tolist(),
        "attacked_vanilla_prediction": attacked_vanilla.tolist(),
        "attacked_prediction": detection.prediction.tolist(),
        "detect_output": outputs, "alert_box": alert_boxes, "localized": localized,
        "recovered_prediction": [value if value >= 0 else None for value in recovered],
        "attack_loss": attacked.loss.double().tolist(),
        "attack_steps": attacked.steps.tolist(),
        "latency_ms": [latency_ms] * n,
    })

