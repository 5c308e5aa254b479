"""Stage 1, SIN pruning: keep the k superficial-layer positions with the largest importance.

The SIN score of a position is the sum over channels of the (non-negative) stem features.
``keep_m`` takes the k highest-scoring positions outside a window's footprint, ties broken by
a fixed total order (score descending, then flat index ascending), so the selection is a pure
function of the scores outside the footprint. Everything else is zeroed before the head runs.
"""

from __future__ import annotations

import math

import torch


def keep_count(top_k: float, feature_hw: tuple[int, int]) -> int:
    """k = ceil(top_k * h * w), at least 1."""
    h, w = feature_hw
    return max(1, math.ceil(top_k * h * w - 1e-9))


def sin_scores(features: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` features -> ``B x (h*w)`` SIN scores (sum over channels)."""
    return features.sum(dim=1).flatten(1)


def selection_order(scores: torch.Tensor) -> torch.Tensor:
    """Flat position indices of each row in selection order: score descending, index ascending.

    A stable sort keeps equal scores in index order, which is the tie-break rule.
    """
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def keep_positions(order: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """keep_m for each row: the first k positions of ``order`` that are not ``excluded``.

    order: ``n x P`` selection orders; excluded: ``n x P`` boolean footprints (all False for
    M(x)). Returns an ``n x P`` boolean mask with min(k, #not excluded) True entries per row.
    """
    available = ~torch.gather(excluded, 1, order)
    rank = torch.cumsum(available, dim=1, dtype=torch.int32)
    chosen = available & (rank <= k)
    return torch.zeros_like(excluded).scatter_(1, order, chosen)


def prune(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero every feature outside ``keep`` (``n x P``); kept features pass bit for bit."""
    mask = keep.view(keep.shape[0], 1, *features.shape[2:])
    return torch.where(mask, features, torch.zeros((), dtype=features.dtype, device=features.device))
