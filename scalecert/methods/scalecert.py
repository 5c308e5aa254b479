"""ScaleCert (Han et al., NeurIPS 2021): the SIN-pruned model, each window removed from the
superficial-layer features.

Certification drives :class:`~scalecert.occlusion.SinPredictor`: the stem runs once per image
and a window whose footprint misses the image's kept positions needs no run (the skip lemma).
Fine-tuning trains the same forward pass, F(x, m) = g(A * 1[keep_m]), with the selection made
on detached scores so that gradient reaches only kept features (winner-take-all).
"""

from __future__ import annotations

import torch

from scalecert.config import CertConfig
from scalecert.geometry import Footprints
from scalecert.models.base import StagedClassifier
from scalecert.occlusion import SinPredictor
from scalecert.sin import keep_count, keep_positions, prune, selection_order, sin_scores


def predictor(model: StagedClassifier, config: CertConfig) -> SinPredictor:
    """F(x, m) for certification: the model split at ``config.layer``, top ``config.top_k``."""
    return SinPredictor(model, config.top_k, config.layer)


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Logits of F(x, m) for training, one window per image (the empty box: none)."""
    split = model.split(config.layer)
    features = split.stem(images)
    feature_hw = tuple(features.shape[2:])
    excluded = Footprints(split.geometry, feature_hw)(windows).to(features.device)
    order = selection_order(sin_scores(features.detach()))
    keep = keep_positions(order, excluded, keep_count(config.top_k, feature_hw))
    return split.head(prune(features, keep))
