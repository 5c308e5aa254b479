"""(image, window) pairs through g in shared batches: the service a certifier gives its method.

Each pair's input comes from the method's predictor (``g_inputs``), ``batch_size`` pairs per
run of g, through the run's :class:`~scalecert.precision.GRunner` (fp32, or a fast path whose
decisions equal fp32's). M(x) and the undefended prediction are computed once per prepared
batch and kept in its memo, so certifiers that share the batch share them too.
"""

from __future__ import annotations

import torch

from scalecert.methods.base import EMPTY_BOX, MaskedPredictor, PreparedBatch, Runs
from scalecert.precision import GRunner, top_confidence
from scalecert.precision import margins as logit_margins


class PairRunner:
    """:class:`~scalecert.methods.base.Pairs` for one predictor and one runner of its g."""

    def __init__(self, predictor: MaskedPredictor, runner: GRunner, batch_size: int,
                 num_classes: int, margin: float) -> None:
        self.predictor = predictor
        self.runner = runner
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.margin = margin

    def run(self, batch: PreparedBatch, image_index: torch.Tensor, boxes: torch.Tensor,
            labels: torch.Tensor | None) -> Runs:
        """Predictions, margins and confidences of F(x_i, box_i), ``batch_size`` pairs per run
        of g."""
        predictions, pair_margins, confidences = [], [], []
        device = self.runner.device
        for start in range(0, len(image_index), self.batch_size):
            index = image_index[start:start + self.batch_size]
            pair_labels = None if labels is None else labels[index]
            inputs = self.predictor.g_inputs(
                batch, index.to(device), boxes[start:start + self.batch_size])
            logits = self.runner(inputs, pair_labels).cpu()
            predictions.append(logits.argmax(dim=1))
            pair_margins.append(logit_margins(logits, pair_labels))
            confidences.append(top_confidence(logits))
        if not predictions:
            return Runs(torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0))
        return Runs(torch.cat(predictions), torch.cat(pair_margins), torch.cat(confidences))

    def unmasked(self, batch: PreparedBatch, labels: torch.Tensor | None) -> Runs:
        """M(x), its margins and confidences, once per prepared batch (patch sizes and
        methods sharing the batch do not change M(x))."""
        key = self._memo_key("M(x)", labels)
        if key not in batch.memo:
            n_images = len(batch)
            batch.memo[key] = self.run(
                batch, torch.arange(n_images), torch.tensor([EMPTY_BOX]).expand(n_images, 4),
                labels)
        return batch.memo[key]

    def undefended(self, batch: PreparedBatch) -> torch.Tensor:
        """g on the unmasked, unpruned inputs, once per prepared batch."""
        key = self._memo_key("vanilla", None)
        if key not in batch.memo:
            inputs = self.predictor.unmasked_inputs(batch)
            batch.memo[key] = torch.cat([
                self.runner(inputs[start:start + self.batch_size]).argmax(dim=1).cpu()
                for start in range(0, len(inputs), self.batch_size)
            ])
        return batch.memo[key]

    def _memo_key(self, kind: str, labels: torch.Tensor | None) -> tuple:
        """What a memoised result of the prepared batch depends on besides its images."""
        return (kind, self.runner.fast, self.margin, self.runner.confidence_levels,
                None if labels is None else labels.numpy().tobytes())
