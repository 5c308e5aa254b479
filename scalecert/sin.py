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
    return keep_in_order(order, torch.gather(excluded, 1, order), k, excluded.shape[1])


def keep_in_order(
    order: torch.Tensor, excluded: torch.Tensor, k: int, positions: int
) -> torch.Tensor:
    """:func:`keep_positions` with the exclusions read in selection order: ``excluded[i, j]``
    tells whether position ``order[i, j]`` is excluded; ``positions`` is P.

    ``order`` may hold only the first columns of each row's selection order, provided each
    row's first k positions not excluded lie among them (the whole order always does; so does
    a prefix of k plus the number of the row's excluded positions): keep_m takes nothing after
    them. The result equals :func:`keep_positions` on the whole order, bit for bit, and a
    short prefix is what makes F(x, m)'s inputs cheap (k and a footprint are a fraction of P).
    """
    keep = torch.zeros((order.shape[0], positions), dtype=torch.bool, device=order.device)
    return keep.scatter_(1, order, chosen_in_order(excluded, k))


def chosen_in_order(excluded: torch.Tensor, k: int) -> torch.Tensor:
    """keep_m in selection order: ``chosen[i, j]`` tells whether the j-th position of row i's
    order is kept, given ``excluded`` in that order (see :func:`keep_in_order`): the first k
    positions not excluded are."""
    available = ~excluded
    rank = torch.cumsum(available, dim=1, dtype=torch.int32)
    return available & (rank <= k)


def prune(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero every feature outside ``keep`` (``n x P``); kept features pass bit for bit."""
    mask = keep.view(keep.shape[0], 1, *features.shape[2:])
    return torch.where(mask, features, torch.zeros((), dtype=features.dtype, device=features.device))


def gather_pruned(
    features: torch.Tensor, index: torch.Tensor, pair: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """``prune(features[index], keep)``, bit for bit, in channels_last, without the gathered
    copy: a zeroed output receives only the kept positions' channel vectors. ``keep`` is given
    by its True entries, ``keep[pair[j], position[j]]`` (``keep.nonzero(as_tuple=True)``, in
    any order), so a caller that knows them need not build the ``n x P`` mask.

    Gathering ``features[index]`` and then masking it reads and writes all n x C x P floats
    twice; this writes one zero fill and copies only the kept positions (k of P, 15% by
    default). ``features`` (``B x C x h x w``) should be channels_last, as stem outputs are:
    each position's channels are then one row of a ``(B * P) x C`` view; otherwise that table
    is a copy (slow, still exact).
    """
    count, (batch, channels, height, width) = len(index), features.shape
    positions = height * width
    table = features.permute(0, 2, 3, 1).reshape(batch * positions, channels)
    rows = table.index_select(0, index[pair] * positions + position)  # row copies, not
    pruned = table.new_zeros((count * positions, channels))           # per-element indexing
    pruned.index_copy_(0, pair * positions + position, rows)
    return pruned.view(count, height, width, channels).permute(0, 3, 1, 2)
