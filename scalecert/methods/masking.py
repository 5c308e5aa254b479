"""The masking baseline: Minority Reports certified detection (McCoyd et al., 2020) with
PatchCleanser-style windows. The unpruned model classifies the image with each window's pixels
set to ``config.occlusion_value``; every window changes the input, so none is skipped.
"""

from __future__ import annotations

import torch

from scalecert.baselines import OcclusionPredictor, box_masks
from scalecert.config import CertConfig
from scalecert.models.base import StagedClassifier


def predictor(model: StagedClassifier, config: CertConfig) -> OcclusionPredictor:
    """F(x, m) for certification: the whole model on occluded pixels."""
    if config.layer is not None:  # a layer named for every method must exist; no split needed
        model.split(config.layer)
    return OcclusionPredictor(model, config.occlusion_value)


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Logits of the unpruned model on the images occluded by ``windows`` (empty: none)."""
    masks = box_masks(windows.to(images.device), images.shape[2:])
    return model(torch.where(masks, torch.full_like(images, config.occlusion_value), images))
