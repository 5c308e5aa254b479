"""``scalecert attack``'s worker: certifies each clean image, attacks it, runs the defense on
the attacked image, and makes one attack row per (image, patch size, method)
(:mod:`pipeline.io.attack_rows`).

It is the shard worker (:class:`~pipeline.run.worker.ShardWorker`: model loaded once,
decoding a chunk ahead, atomic Parquet per shard) with its own chunk step, rows and folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.attack.config import AttackOptions
from pipeline.compute.batches import as_arrays
from pipeline.io.attack_rows import ATTACK_ROWS, attack_error_rows, attack_rows
from pipeline.io.certificates import RowContext
from pipeline.io.sources import ImageRecord
from pipeline.run.worker import ShardWorker, WorkerSettings
from scalecert.attack_registry import attack_info
from scalecert.attacks import attack_images


@dataclass(frozen=True)
class AttackSettings:
    """What an attack worker needs besides the certify worker's settings: the options and,
    for ``--attack universal``, the trained patch of each (patch size, method)."""

    options: AttackOptions
    universal_patches: dict[str, Any]  # universal_key(px, method) -> C x p x p nested lists


def universal_key(patch_px: int, method: str) -> str:
    return f"{patch_px}px/{method}"


class AttackWorker(ShardWorker):
    """Attacks shards with one model held in memory: one attack row per image x patch size x
    method, in ``<out>/attacks/``."""

    rows = ATTACK_ROWS

    def __init__(self, settings: WorkerSettings, attack: AttackSettings) -> None:
        self.attack = attack
        options = attack.options
        self.attack_columns = {  # what every row of the run shares
            "attack": options.attack, "attack_model": options.attack_model,
            "alpha": options.alpha if attack_info(options.attack).uses_alpha else None,
            "target": options.target}
        super().__init__(settings)

    def _error_rows(self, context: RowContext, record: ImageRecord, reason: str) -> pa.Table:
        keys = [(self.attack.options.attack, px, method) for px, method in self.keys]
        return attack_error_rows(context, record.image_id, record.label, reason, keys)

    def _chunk_rows(
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
                attacked_vanilla = self.model(attacked.images).argmax(dim=1).cpu().numpy()
            detection = certifier.detect(attacked.images)
            blocks.append(attack_rows(
                context, ids, labels.tolist(), self.attack_columns, method, patch_px,
                as_arrays(outcome.result), as_arrays(attacked, ("boxes", "loss", "steps")),
                attacked_vanilla, as_arrays(detection),
                latency_ms=1000.0 * (time.perf_counter() - began) / len(chunk)))
        return blocks

