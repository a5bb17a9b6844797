"""Rank splits of in-memory items: every item once, equal counts on every rank, dealt by stride."""

from __future__ import annotations

import pytest

from datamodules.ranks import deal, rank_slice


@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_slice_deals_every_index_once_and_pads_to_one_count(n, world):
    shares = [rank_slice(n, r, world) for r in range(world)]
    assert sorted(i for indices, _ in shares for i in indices) == list(range(n))
    assert len({per_rank for _, per_rank in shares}) == 1
    per_rank = shares[0][1]
    assert all(0 <= per_rank - len(indices) <= 1 for indices, _ in shares)  # at most one padding item
    assert [indices for indices, _ in shares] == [deal(range(n), r, world) for r in range(world)]


def test_rank_slice_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="outside world size"):
        rank_slice(4, 2, 2)
