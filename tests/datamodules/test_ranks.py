"""Rank splits: in-memory items dealt by stride (every item once, equal counts on every rank), and a
streamed slot's packed plan and the assembly of its batches."""

from __future__ import annotations

import pytest

from datamodules.ranks import SlotPlan, assemble_planned, deal, rank_slice


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


BATCHES = [[(2, 5), (0, 1)], [(0, 0)], [(2, 0), (0, 3), (1, 7)]]


def test_a_packed_plan_holds_its_batches_as_arrays():
    slot = SlotPlan.packed(BATCHES, pad_batches=2)
    assert slot.batches == BATCHES and slot.planned_batches == 3 and slot.num_batches == 5
    assert slot.positions.dtype.itemsize == 4 and slot.positions.shape == (6, 2)  # 8 bytes a sample
    empty = SlotPlan.packed([])
    assert empty.batches == [] and empty.num_batches == 0


def test_assembly_yields_each_planned_batch_once_complete_then_the_padding():
    slot = SlotPlan.packed(BATCHES, pad_batches=1)
    order = [(0, 0), (0, 1), (0, 3), (1, 7), (2, 0), (2, 5)]  # the read order, not the batch order
    samples = [(pos, None if pos == (0, 3) else {"pos": pos}) for pos in order]  # (0, 3) was skipped
    out = list(assemble_planned(slot, iter(samples)))
    # Each batch as it completes, its samples in arrival order; the padding batch last.
    assert out == [[{"pos": (0, 0)}], [{"pos": (1, 7)}, {"pos": (2, 0)}], [{"pos": (0, 1)}, {"pos": (2, 5)}], []]


@pytest.mark.parametrize("samples, message", [
    ([((0, 9), {})], "not in this slot's plan"),
    ([((5, 0), {})], "not in this slot's plan"),
    ([((0, 0), {}), ((0, 0), {})], "arrived twice"),
    ([((0, 0), {})], "5 planned samples never arrived"),
])  # fmt: skip
def test_assembly_refuses_a_stray_a_repeated_or_a_missing_sample(samples, message):
    with pytest.raises(ValueError, match=message):
        list(assemble_planned(SlotPlan.packed(BATCHES), iter(samples)))
