"""Double masking on the SIN-pruned model: PatchCleanser's rule with ScaleCert's features.

F(x, m) = g(A * 1[keep_m]) as for ScaleCert, and F(x, {a, b}) = g(A * 1[keep_{a,b}]), where
keep_{a,b} is the first k positions of the image's selection order outside the union of both
windows' footprints. A patch inside window m* changes A only inside foot(m*), so every
prediction with m* (alone or paired) is the same on the patched image as on the clean one: the
premise PatchCleanser's proof needs (DESIGN-NOTES "Certified recovery"). A window or pair whose
footprints miss the kept positions leaves keep unchanged and predicts M(x) with no run (the
skip lemma, for pairs too). None of the published defenses has this variant.
"""

from __future__ import annotations

import torch

from scalecert.config import CertConfig
from scalecert.methods import scalecert
from scalecert.methods.patchcleanser import DOUBLE_MASKING, RecoveryRule
from scalecert.models.base import StagedClassifier


def predictor(model: StagedClassifier, config: CertConfig) -> scalecert.SinPredictor:
    """F(x, m) and F(x, {a, b}) on the SIN-pruned model (ScaleCert's predictor)."""
    return scalecert.predictor(model, config)


def build(model: StagedClassifier, config: CertConfig) -> RecoveryRule:
    """Double masking on the SIN predictor; shares prepared stems with ScaleCert's settings of
    the same layer and top-k."""
    sin = predictor(model, config)
    return RecoveryRule(sin, config, DOUBLE_MASKING,
                        preparation_key=scalecert.preparation_key(sin))


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Fine-tuning trains ScaleCert's forward pass (one window per image)."""
    return scalecert.defended_logits(model, config, images, windows)
