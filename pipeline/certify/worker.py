"""``scalecert certify``'s worker: the shard worker (:mod:`pipeline.run.worker`) whose chunk
step certifies every image for every (patch size, method) at once and makes certificate rows
(:mod:`pipeline.io.certificates`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.compute.batches import as_arrays
from pipeline.io.certificates import CERTIFICATES, RowContext, certificate_rows, error_rows
from pipeline.io.sources import ImageRecord
from pipeline.run.worker import ShardWorker


class CertifyWorker(ShardWorker):
    """Certifies shards with one model held in memory: one certificate row per image x patch
    size x method, in ``<out>/certificates/``."""

    rows = CERTIFICATES

    def _error_rows(self, context: RowContext, record: ImageRecord, reason: str) -> pa.Table:
        """One error row per (patch size, method)."""
        return error_rows(context, record.image_id, record.label, reason, self.keys)

    def _chunk_rows(
        self,
        context: RowContext,
        chunk: list[tuple[ImageRecord, np.ndarray]],
        certified: dict[str, int],
    ) -> list[pa.Table]:
        ids, labels, images = self._batch(chunk)
        blocks = []
        outcomes = self.certifiers.certify(images, labels)  # stems and M(x) shared
        for (patch_px, method), outcome in zip(self.keys, outcomes):
            latency = 1000.0 * outcome.seconds / len(chunk)
            result = as_arrays(outcome.result)
            certified[f"{patch_px}px/{method}"] += int(result["certified"].sum())
            blocks.append(certificate_rows(context, ids, labels.tolist(), method, patch_px, result,
                                           latency, with_mask_map=self.settings.run.full_map))
        return blocks
