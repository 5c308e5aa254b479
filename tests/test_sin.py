"""SIN pruning: k, the tie-break order, and keep_m against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from scalecert.sin import (
    gather_pruned,
    keep_count,
    keep_in_order,
    keep_positions,
    prune,
    selection_order,
    sin_scores,
)


def reference_keep(scores: list[float], excluded: list[bool], k: int) -> set[int]:
    """keep_m by definition: the k best positions outside the footprint, by (score desc, index asc)."""
    candidates = [i for i in range(len(scores)) if not excluded[i]]
    candidates.sort(key=lambda i: (-scores[i], i))
    return set(candidates[:k])


@pytest.mark.parametrize(("top_k", "hw", "expected"), [
    (0.1, (10, 10), 10),  # 0.1 * 100 is 10.000000000000002 in floating point
    (0.15, (32, 32), 154),
    (1.0, (7, 9), 63),
    (1e-6, (4, 4), 1),
])
def test_keep_count_is_the_ceiling(top_k: float, hw: tuple[int, int], expected: int) -> None:
    assert keep_count(top_k, hw) == expected


def test_scores_sum_channels() -> None:
    features = torch.arange(24, dtype=torch.float32).view(1, 2, 3, 4)
    assert torch.equal(sin_scores(features), (features[0, 0] + features[0, 1]).flatten()[None])


def test_ties_are_broken_by_flat_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    assert selection_order(scores).tolist() == [[1, 2, 4, 0, 5, 3]]
    keep = keep_positions(selection_order(scores), torch.zeros(1, 6, dtype=torch.bool), 2)
    assert keep.nonzero()[:, 1].tolist() == [1, 2]


def test_keep_matches_the_definition_on_random_cases_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        positions = int(torch.randint(1, 40, (1,), generator=generator))
        scores = torch.randint(0, 4, (3, positions), generator=generator).float()  # many ties
        excluded = torch.rand(3, positions, generator=generator) < 0.4
        k = int(torch.randint(1, positions + 3, (1,), generator=generator))
        keep = keep_positions(selection_order(scores), excluded, k)
        for row in range(3):
            expected = reference_keep(scores[row].tolist(), excluded[row].tolist(), k)
            assert set(keep[row].nonzero()[:, 0].tolist()) == expected, trial


def test_keep_from_a_prefix_of_the_order_equals_keep_from_the_whole_order() -> None:
    """keep_in_order on the first k + (excluded count) columns of the order, with exclusions
    read in order, gives keep_positions' result on the whole order, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    for trial in range(200):
        positions = int(torch.randint(1, 60, (1,), generator=generator))
        scores = torch.randint(0, 4, (5, positions), generator=generator).float()
        share = float(torch.rand(1, generator=generator))  # from no exclusions to all
        excluded = torch.rand(5, positions, generator=generator) < share
        k = int(torch.randint(1, positions + 3, (1,), generator=generator))
        order = selection_order(scores)
        expected = keep_positions(order, excluded, k)
        span = min(positions, k + int(excluded.sum(dim=1).max()))
        prefix = order[:, :span]
        keep = keep_in_order(prefix, torch.gather(excluded, 1, prefix), k, positions)
        assert keep.dtype == expected.dtype and torch.equal(keep, expected), trial


def test_removing_unselected_candidates_never_changes_the_top_k() -> None:
    """The skip lemma: a footprint that misses keep_empty leaves keep_m = keep_empty."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (1, 64), generator=generator).float()
    order = selection_order(scores)
    keep_empty = keep_positions(order, torch.zeros(1, 64, dtype=torch.bool), 10)
    for _ in range(100):
        excluded = (torch.rand(1, 64, generator=generator) < 0.5) & ~keep_empty
        assert torch.equal(keep_positions(order, excluded, 10), keep_empty)


def test_prune_keeps_selected_features_bit_for_bit() -> None:
    features = torch.rand(2, 3, 4, 4) + 0.5
    keep = torch.rand(2, 16) < 0.5
    pruned = prune(features, keep)
    mask = keep.view(2, 1, 4, 4).expand_as(features)
    assert torch.equal(pruned[mask], features[mask])
    assert bool((pruned[~mask] == 0).all())


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_gather_pruned_is_prune_of_the_gathered_rows(memory_format) -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(6, 5, 4, 3, generator=generator).contiguous(memory_format=memory_format)
    features[0, :, 0, 0] = -0.0  # signed zeros pass as they are
    index = torch.tensor([0, 5, 5, 2, 0, 3, 1])
    keep = torch.rand(len(index), 12, generator=generator) < 0.3
    keep[0] = True
    keep[1] = False
    expected = prune(features[index], keep)
    pruned = gather_pruned(features, index, *keep.nonzero(as_tuple=True))
    assert pruned.is_contiguous(memory_format=torch.channels_last)
    assert pruned.dtype == expected.dtype and torch.equal(pruned, expected)
    bits = [t.contiguous().view(torch.int32) for t in (pruned, expected)]
    assert torch.equal(*bits)  # bit patterns: the signs of zeros included
