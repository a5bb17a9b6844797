"""How data is split over DDP ranks, in one place: every rank runs the same number of batches.

One guarantee for every kind of data: each example is used exactly once per epoch (padding, where
there is any, is marked as such) and every rank runs as many batches, so DDP's gradient all-reduce
never waits on a rank that ran out. The rank and world size always come from the trainer
(:func:`trainer_rank`), never the environment.

Two schemes, because the data is held two ways:

* streamed shards (``datamodules/shard_dataset.py``): no rank holds the data, so the split is
  planned from the shard index alone. :func:`plan_exact_epoch` deals shards (or strided parts of
  them) to ``(rank, worker)`` slots by seconds and pads the ranks with fewer batches;
  :func:`assemble_planned` routes the decoded samples into the planned batches.
* in-memory items: dealt by stride, :func:`deal` (``items[rank::world_size]``), whatever the unit.
  What is dealt, and how the counts are made equal, is each caller's training contract:

  - :func:`split_for_ranks` deals whole *batches* (stage 3's per-rank ``batch_size``): a count that
    does not divide is fixed by halving the largest batches, as training must not repeat an example;
  - :func:`split_global_batches` deals the *examples of each global batch* (stage 3's
    ``global_batch_size``): step k on all ranks together is the one-process batch k, so a batch
    smaller than the world is merged into the one before it;
  - :func:`rank_slice` deals *examples* for prediction (stage 2's synthesis): the counts are made
    equal with padding copies the caller marks (weight 0), since the writer drops them and no
    example's output may be lost or merged.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from datamodules.pipeline import BatchSpec, bucket_batches, seeded_rng, shuffle_buffer

__all__ = [
    "EpochPlan",
    "SlotPlan",
    "assemble_planned",
    "deal",
    "plan_exact_epoch",
    "rank_slice",
    "split_for_ranks",
    "split_global_batches",
    "trainer_rank",
]

T = TypeVar("T")
Position = tuple[int, int]  # (shard index in the index, sample position inside that shard)


def trainer_rank(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of the trainer a datamodule is attached to; ``(0, 1)`` without one."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def deal(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` dealt by stride: ``items[rank::world_size]``."""
    return list(items[rank::world_size])


def split_for_ranks(batches: list[list[int]], world_size: int) -> list[list[list[int]]]:
    """Deal batches to ranks so every example is used exactly once and every rank runs as many batches.

    When the batch count does not divide by ``world_size``, the largest batches are halved until it
    does (nothing is dropped or repeated). The rank passed in comes from the trainer, not the
    environment.
    """
    batches = [list(b) for b in batches]
    if sum(len(b) for b in batches) < world_size:
        raise ValueError(f"{sum(len(b) for b in batches)} examples cannot feed {world_size} ranks")
    while len(batches) % world_size:
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        big = batches.pop(i)
        batches[i:i] = [big[: len(big) // 2], big[len(big) // 2 :]]
    return [deal(batches, r, world_size) for r in range(world_size)]


def split_global_batches(batches: list[list[int]], world_size: int) -> list[list[list[int]]]:
    """Split every global batch over the ranks: step k of rank r holds ``batches[k][r::world_size]``.

    A batch smaller than ``world_size`` is merged into the one before it, so no rank gets an empty
    batch and every example is used exactly once.
    """
    merged: list[list[int]] = []
    for batch in batches:
        if merged and len(batch) < world_size:
            merged[-1] = merged[-1] + list(batch)
        else:
            merged.append(list(batch))
    if any(len(b) < world_size for b in merged):
        raise ValueError(f"{sum(len(b) for b in batches)} examples cannot feed {world_size} ranks")
    return [[deal(b, r, world_size) for b in merged] for r in range(world_size)]


def rank_slice(n: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Indices of rank ``rank``'s share of ``range(n)``, dealt by stride (:func:`deal`), and the padded count.

    Returns:
        ``(indices, per_rank)``: every index in ``range(n)`` lands on exactly one rank; ``per_rank =
        ceil(n / world_size)`` is the length every rank pads to (at most one padding item a rank).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    per_rank = math.ceil(n / world_size) if n else 0
    return deal(range(n), rank, world_size), per_rank


def _no_positions() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int32)


def _no_offsets() -> np.ndarray:
    return np.zeros(1, dtype=np.int64)


@dataclass
class SlotPlan:
    """What one ``(rank, worker)`` slot does in an exact epoch.

    The planned batches are held as two arrays, not as Python lists of tuples: 8 bytes a sample
    instead of ~100, which is what lets a rank plan an epoch of millions of rows (every rank plans
    every slot, so this is paid for the whole epoch in every process).

    Attributes:
        reads: shards to read in order, as ``(shard index, owned positions)``; ``None`` owns all.
        positions: ``[n, 2]`` int32 ``(shard index, position)`` of the planned samples, batch after batch.
        offsets: ``[batches + 1]``: batch ``i`` is ``positions[offsets[i]:offsets[i + 1]]``.
        pad_batches: padding batches appended so every rank yields the same count.
    """

    reads: list[tuple[int, tuple[int, ...] | None]] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=_no_positions)
    offsets: np.ndarray = field(default_factory=_no_offsets)
    pad_batches: int = 0

    @classmethod
    def packed(cls, batches: Iterable[Sequence[Position]], **kwargs: Any) -> SlotPlan:
        """A plan holding ``batches`` (lists of ``(shard, position)``), packed batch by batch."""
        flat, sizes = array("i"), array("q", [0])
        for batch in batches:
            for shard, pos in batch:
                flat.append(shard)
                flat.append(pos)
            sizes.append(sizes[-1] + len(batch))
        positions = np.frombuffer(flat, dtype=np.int32).reshape(-1, 2).copy() if flat else _no_positions()
        return cls(positions=positions, offsets=np.frombuffer(sizes, dtype=np.int64).copy(), **kwargs)

    @property
    def batches(self) -> list[list[Position]]:
        """The planned batches as lists of ``(shard, position)`` (built on each call: for inspection)."""
        rows = self.positions.tolist()
        return [[tuple(r) for r in rows[a:b]] for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]

    @property
    def planned_batches(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_batches(self) -> int:
        return self.planned_batches + self.pad_batches


@dataclass
class EpochPlan:
    """The exact plan of one epoch: ``slots[rank][worker]``; every rank yields ``batches_per_rank``."""

    slots: list[list[SlotPlan]]
    batches_per_rank: int


def plan_exact_epoch(
    durations: Sequence[Sequence[float]],
    *,
    world_size: int,
    num_workers: int,
    spec: BatchSpec,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    buffer: int = 0,
) -> EpochPlan:
    """Plan an epoch in which every sample is seen once and all ranks yield equally many batches.

    Computed from the index alone, so every rank and worker gets the same plan. Shards, longest
    first, go to the rank, then the worker, with the fewest seconds so far (each slot then reads its
    shards in an order shuffled by ``(seed, epoch)``);
    with fewer shards than ``world_size * num_workers`` slots each shard is split by stride
    (``k``-th samples) so no slot is left without data. Each slot's position stream goes through
    the same seeded :func:`shuffle_buffer` and :func:`bucket_batches` the data would, and ranks
    with fewer batches get padding batches, spread over their workers.

    Args:
        durations: ``durations[shard][position]`` in seconds.
        world_size: number of ranks.
        num_workers: DataLoader workers per rank (0 counts as 1).
        spec: batching limits.
        seed, epoch: shuffle seed; the epoch changes the order every epoch.
        shuffle: shuffle shard order and positions (``False`` for evaluation).
        buffer: in-stream shuffle buffer size (only with ``shuffle``).

    Returns:
        The :class:`EpochPlan`.
    """
    workers = max(1, num_workers)
    slots = [[SlotPlan() for _ in range(workers)] for _ in range(world_size)]
    order = list(range(len(durations)))
    if shuffle:
        seeded_rng(seed, epoch, "shards").shuffle(order)
    # Longest first balances ranks best (LPT); the shuffle above only breaks ties between equal shards
    # (each slot's reading order is shuffled below).
    order.sort(key=lambda s: -sum(durations[s]))
    split = math.ceil(world_size * workers / len(order)) if 0 < len(order) < world_size * workers else 1
    rank_load = [0.0] * world_size
    slot_load = [[0.0] * workers for _ in range(world_size)]
    # Whole shards (split 1) are owned as None, never as lists of their positions.
    owned: list[list[dict[int, list[int] | None]]] = [[{} for _ in range(workers)] for _ in range(world_size)]
    for shard in order:
        for offset in range(split):
            positions = range(offset, len(durations[shard]), split)
            if split > 1 and not positions:
                continue
            r = min(range(world_size), key=lambda i: (rank_load[i], i))
            w = min(range(workers), key=lambda i: (slot_load[r][i], i))
            seconds = sum(durations[shard]) if split == 1 else sum(durations[shard][p] for p in positions)
            rank_load[r] += seconds
            slot_load[r][w] += seconds
            if split == 1:
                owned[r][w][shard] = None
            else:
                owned[r][w].setdefault(shard, []).extend(positions)  # type: ignore[union-attr]
    for r in range(world_size):
        for w in range(workers):
            reads = [(s, None if p is None else tuple(sorted(p))) for s, p in owned[r][w].items()]
            if shuffle:
                seeded_rng(seed, epoch, r, w, "reads").shuffle(reads)
            # A stream, never a list: planning holds the shuffle buffer and the open buckets, not the epoch.
            stream: Iterable[Position] = (
                (s, p) for s, ps in reads for p in (ps if ps is not None else range(len(durations[s])))
            )
            if shuffle:
                stream = shuffle_buffer(stream, buffer, seeded_rng(seed, epoch, r, w, "buffer"))
            slots[r][w] = SlotPlan.packed(bucket_batches(stream, lambda sp: durations[sp[0]][sp[1]], spec), reads=reads)
    total = max(sum(s.planned_batches for s in rank) for rank in slots) if slots else 0
    for rank in slots:
        for _ in range(total - sum(s.planned_batches for s in rank)):
            min(rank, key=lambda s: s.num_batches).pad_batches += 1
    return EpochPlan(slots=slots, batches_per_rank=total)


def assemble_planned(
    slot: SlotPlan,
    samples: Iterable[tuple[Position, dict[str, Any] | None]],
) -> Iterator[list[dict[str, Any]]]:
    """Route decoded samples into the slot's planned batches; yield each batch once it is complete.

    Args:
        slot: the slot's plan.
        samples: ``((shard, position), sample)`` for every owned position, in read order; ``None``
            marks a position that was skipped (corrupt or missing), which only shrinks its batch.

    Yields:
        Each planned batch's good samples (possibly an empty list: the caller pads it), then
        ``slot.pad_batches`` empty lists. Exactly ``slot.num_batches`` lists in all.

    Raises:
        ValueError: a position that is not in the plan, or planned positions that never arrived.
    """
    n = slot.planned_batches
    sizes = np.diff(slot.offsets)
    waiting = sizes.tolist()
    # Per shard, position -> its planned batch (-1: not this slot's, or already arrived): 4 bytes a
    # position where a dict of tuples would take ~100.
    batch_of = np.repeat(np.arange(n, dtype=np.int32), sizes)
    order = np.argsort(slot.positions[:, 0], kind="stable")
    shards, starts = np.unique(slot.positions[order, 0], return_index=True)
    where: dict[int, np.ndarray] = {}
    for shard, a, b in zip(shards.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
        rows = order[a:b]
        table = np.full(int(slot.positions[rows, 1].max()) + 1, -1, dtype=np.int32)
        table[slot.positions[rows, 1]] = batch_of[rows]
        where[shard] = table
    remaining = len(slot.positions)
    filled: dict[int, list[dict[str, Any]]] = {}
    for pos, sample in samples:
        table = where.get(pos[0])
        i = int(table[pos[1]]) if table is not None and 0 <= pos[1] < len(table) else -1
        if i < 0:
            raise ValueError(f"sample at {pos} is not in this slot's plan (or arrived twice)")
        table[pos[1]] = -1
        remaining -= 1
        if sample is not None:
            filled.setdefault(i, []).append(sample)
        waiting[i] -= 1
        if waiting[i] == 0:
            yield filled.pop(i, [])
    if remaining:
        shard, table = next((s, t) for s, t in where.items() if (t >= 0).any())
        raise ValueError(f"{remaining} planned samples never arrived, e.g. {(shard, int(np.flatnonzero(table >= 0)[0]))}")
    for _ in range(slot.pad_batches):
        yield []
