"""The dataset behind :class:`datamodules.speech.SpeechDataModule`: batches from WebDataset shards.

Exact-once epochs follow the plan of :func:`datamodules.ranks.plan_exact_epoch` (equal batch counts
on every rank, padding batches where a rank has fewer); resampled epochs draw shards with
replacement. Samples are read and decoded by ``datamodules/pipeline.py`` (:func:`read_shard`,
:func:`decode_sample`), token shards joined with their speech shards on ``__key__``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice
from typing import Any, Literal

from torch.utils.data import IterableDataset, get_worker_info

from datamodules.pipeline import (
    SHARD_READ_ERRORS,
    BatchSpec,
    SampleError,
    SkipCounter,
    bucket_batches,
    collate_samples,
    decode_sample,
    read_shard,
    seeded_rng,
    shuffle_buffer,
)
from datamodules.ranks import EpochPlan, assemble_planned, plan_exact_epoch
from datamodules.shards import ShardIndex, ShardInfo
from datamodules.sources import View, check_weights, epoch_views, merge_indexes

__all__ = ["Fields", "ShardDataset"]

log = logging.getLogger(__name__)

Fields = Literal["audio", "tokens", "both", "states"]


def _mirror_paths(index: ShardIndex, tokens: ShardIndex) -> list[str]:
    """Token shard paths in the order of ``index``'s shards, matched by basename."""
    by_name = {os.path.basename(p): (p, info) for p, info in zip(tokens.paths(), tokens.shards)}
    out = []
    for path, info in zip(index.paths(), index.shards):
        name = os.path.basename(path)
        if name not in by_name:
            raise ValueError(f"no token shard named {name!r} mirrors speech shard {path!r}")
        tpath, tinfo = by_name[name]
        if tinfo.samples != info.samples:
            raise ValueError(f"{tpath} has {tinfo.samples} samples but {path} has {info.samples}")
        out.append(tpath)
    return out


class ShardDataset(IterableDataset):
    """Batches from WebDataset shards, exact-once or resampled, split over ranks and workers.

    Yields ready batches (``batch_size=None`` in the DataLoader). ``rank``, ``world_size`` and
    ``num_workers`` must be set in the main process before iteration (the datamodule does it);
    workers never read them from the environment.

    Args:
        index: the shards to read (speech shards, or token shards when ``fields="tokens"``), or one
            index per weighted source (see ``datamodules/sources.py``).
        token_index: token shards mirroring ``index`` 1:1 (``fields="both"`` only); one per source
            when ``index`` is a list (shard basenames are matched within a source only, so corpora
            may share shard names and sample keys).
        weights: one per source (default 1 each). ``exact``: each sample of a source appears
            ``floor(w)`` times per epoch, plus once more for a seeded, per-epoch subset of
            ``round(frac(w) * N)`` of its ``N`` samples. ``resampled``: a shard is drawn with
            probability proportional to its samples times its source's weight, so a source's
            expected share of samples equals its share of an exact epoch.
        fields: ``"audio"``, ``"tokens"`` or ``"both"``.
        mode: ``"exact"`` (every sample once per epoch, equal batch counts on all ranks, padding
            batches with ``sample_weight`` 0 where a rank has fewer) or ``"resampled"`` (shards
            drawn with replacement, ``epoch_batches`` batches per rank).
        spec: batching limits.
        epoch_batches: batches per rank per epoch in ``resampled`` mode.
        shuffle: shuffle shards and samples (by ``(seed, epoch)``); off for evaluation.
        buffer: in-stream shuffle buffer size.
        seed: base seed.
        sample_rate: expected audio rate.
        frame_rate: token frames per second (lengths of token samples without ``duration``).
        pad_id: fill value of padded ``codes``.
    """

    def __init__(
        self,
        *,
        index: ShardIndex | Sequence[ShardIndex],
        token_index: ShardIndex | Sequence[ShardIndex] | None = None,
        weights: Sequence[float] | None = None,
        fields: Fields = "audio",
        mode: Literal["exact", "resampled"] = "exact",
        spec: BatchSpec | None = None,
        epoch_batches: int | None = None,
        shuffle: bool = True,
        buffer: int = 0,
        seed: int = 0,
        sample_rate: int = 16000,
        frame_rate: float = 25.0,
        pad_id: int = -1,
    ) -> None:
        if fields not in ("audio", "tokens", "both", "states"):
            raise ValueError(f"fields must be 'audio', 'tokens', 'both' or 'states', got {fields!r}")
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}")
        if mode == "resampled" and (epoch_batches is None or epoch_batches < 1):
            raise ValueError("resampled mode needs epoch_batches >= 1")
        if fields == "both" and token_index is None:
            raise ValueError("fields='both' needs token shards to join with the speech shards")
        indexes = [index] if isinstance(index, ShardIndex) else list(index)
        weights = [1.0] * len(indexes) if weights is None else check_weights(weights, name="weights")
        if len(weights) != len(indexes):
            raise ValueError(f"{len(weights)} weights for {len(indexes)} sources")
        if isinstance(index, ShardIndex):
            self.index, self.source_of = index, [0] * len(index.shards)
        else:
            self.index, self.source_of = merge_indexes(indexes)
        self.weights, self.fields, self.mode = weights, fields, mode
        self.paths = self.index.paths()
        self.token_paths = None
        if fields == "both":
            tokens = [token_index] if isinstance(token_index, ShardIndex) else list(token_index)
            if len(tokens) != len(indexes):
                raise ValueError(f"{len(tokens)} token sources for {len(indexes)} speech sources")
            self.token_paths = [p for idx, tok in zip(indexes, tokens) for p in _mirror_paths(idx, tok)]
        self.spec = spec or BatchSpec()
        self.epoch_batches, self.shuffle, self.buffer, self.seed = epoch_batches, shuffle, buffer, seed
        self.sample_rate, self.frame_rate, self.pad_id = sample_rate, frame_rate, pad_id
        self.durations = [self._durations(info) for info in self.index.shards]
        self.rank, self.world_size, self.num_workers, self.epoch = 0, 1, 0, 0
        self.transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.collate: Callable[[list[dict[str, Any]]], Any] | None = None
        self._plan: tuple[tuple[int, ...], list[View], EpochPlan] | None = None

    @staticmethod
    def _durations(info: ShardInfo) -> list[float]:
        if info.durations is None:
            # Batch counts stay exact (the plan fixes batch membership); only the seconds cap becomes
            # approximate for this shard.
            log.warning("%s has no per-sample durations in its index; planning with the mean", info.url)
            return [info.seconds / max(1, info.samples)] * info.samples
        if len(info.durations) != info.samples:
            raise ValueError(
                f"{info.url}: index lists {len(info.durations)} durations for {info.samples} samples"
            )
        return [float(d) for d in info.durations]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds shuffling; call before iterating (workers copy it at start)."""
        self.epoch = int(epoch)

    def set_distributed(self, *, rank: int, world_size: int, num_workers: int) -> None:
        """Record this process's rank, the world size and the DataLoader's worker count."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def plan(self) -> EpochPlan:
        """The exact-mode plan of the current epoch (the same on every rank and worker)."""
        return self._epoch_plan()[1]

    def _epoch_plan(self) -> tuple[list[View], EpochPlan]:
        """This epoch's shard views (the copies weights ask for) and the plan over them."""
        key = (self.epoch, self.world_size, self.num_workers)
        if self._plan is None or self._plan[0] != key:
            samples = [info.samples for info in self.index.shards]
            views = epoch_views(samples, self.source_of, self.weights, seed=self.seed, epoch=self.epoch)
            durations = [
                self.durations[v.shard]
                if v.positions is None
                else [self.durations[v.shard][p] for p in v.positions]
                for v in views
            ]
            plan = plan_exact_epoch(
                durations,
                world_size=self.world_size,
                num_workers=self.num_workers,
                spec=self.spec,
                seed=self.seed,
                epoch=self.epoch,
                shuffle=self.shuffle,
                buffer=self.buffer,
            )
            self._plan = (key, views, plan)
        return self._plan[1], self._plan[2]

    def num_batches(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        return self.epoch_batches if self.mode == "resampled" else self.plan().batches_per_rank

    # ------------------------------------------------------------------------- iteration

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(1, self.num_workers):
            raise RuntimeError(
                f"the DataLoader runs {workers} workers but the dataset was planned for {self.num_workers}; "
                "call set_distributed(num_workers=...) with the DataLoader's num_workers"
            )
        counter = SkipCounter()
        batches = (
            self._exact(worker, counter)
            if self.mode == "exact"
            else self._resampled(worker, workers, counter)
        )
        yield from batches
        if counter.total:
            log.warning("rank %d worker %d skipped %s this epoch", self.rank, worker, dict(counter.total))

    def _decode(self, raw: dict[str, Any], counter: SkipCounter) -> dict[str, Any] | None:
        try:
            sample = decode_sample(
                raw, fields=self.fields, sample_rate=self.sample_rate, frame_rate=self.frame_rate
            )
        except SampleError as e:
            counter.note(e.reason, raw.get("__key__", "?"), str(e))
            return None
        if self.transform is not None:
            try:
                sample = self.transform(sample)
            except SampleError as e:  # a transform's own reason, counted like a decode error
                counter.note(e.reason, raw.get("__key__", "?"), str(e))
                return None
            if sample is None:
                counter.note("transform_rejected", raw.get("__key__", "?"))
        return sample

    def _read(self, shard: int):
        return read_shard(self.paths[shard], self.token_paths[shard] if self.token_paths else None)

    def _exact(self, worker: int, counter: SkipCounter):
        views, plan = self._epoch_plan()
        slot = plan.slots[self.rank][worker]

        def positioned():
            # The plan's positions are inside a view (a copy of a shard, or its part of a subset).
            for v, owned in slot.reads:
                view = views[v]
                shard, n = view.shard, self.index.shards[view.shard].samples
                real = range(n) if view.positions is None else view.positions
                want = {real[i]: i for i in (range(len(real)) if owned is None else owned)}
                reports_extra = view.positions is None and view.copy == 0
                seen, reason = set(), "missing"
                try:
                    for pos, raw in self._read(shard):
                        if pos in want:
                            seen.add(pos)
                            yield (v, want[pos]), self._decode(raw, counter)
                        elif pos >= n and reports_extra and (owned is None or 0 in want):
                            counter.note(
                                "not_in_index",
                                raw.get("__key__", "?"),
                                f"{self.paths[shard]} has more samples than its index",
                            )
                except SHARD_READ_ERRORS as e:
                    log.warning("cannot read %s further: %s", self.paths[shard], e)
                    reason = "shard_read_error"
                for pos in sorted(set(want) - seen):
                    counter.note(reason, f"{self.paths[shard]}#{pos}")
                    yield (v, want[pos]), None

        last = None
        for samples in assemble_planned(slot, positioned()):
            if samples:
                last = samples[-1]
                yield self._collate([{**s, "sample_weight": 1.0} for s in samples], False, counter)
            else:
                # Forward/backward still run on a padding batch, so DDP's all-reduce gets every rank.
                last = last or self._first_good_sample()
                yield self._collate([{**last, "sample_weight": 0.0}], True, counter)

    def _first_good_sample(self) -> dict[str, Any]:
        quiet = SkipCounter()
        for shard in range(len(self.paths)):
            try:
                for _, raw in self._read(shard):
                    sample = self._decode(raw, quiet)
                    if sample is not None:
                        return sample
            except SHARD_READ_ERRORS:
                continue
        raise RuntimeError("no decodable sample in any shard to build a padding batch from")

    def _resampled(self, worker: int, workers: int, counter: SkipCounter):
        quota = self.epoch_batches // workers + (worker < self.epoch_batches % workers)
        rng = seeded_rng(self.seed, self.epoch, self.rank, worker, "resampled")
        # A corpus's share is its samples times its weight: the share it has in an exact epoch.
        weights = [
            info.samples if self.weights[src] == 1 else info.samples * self.weights[src]
            for info, src in zip(self.index.shards, self.source_of)
        ]
        if not any(weights):
            raise ValueError("resampled mode over shards that hold no samples")

        def endless():
            dry = 0
            while True:
                shard = rng.choices(range(len(self.paths)), weights=weights)[0]
                got = False
                try:
                    for _, raw in self._read(shard):
                        sample = self._decode(raw, counter)
                        if sample is not None:
                            got = True
                            yield sample
                except SHARD_READ_ERRORS as e:
                    counter.note("shard_read_error", self.paths[shard], str(e))
                dry = 0 if got else dry + 1
                if dry > 2 * len(self.paths) + 10:
                    raise RuntimeError(
                        f"{dry} shard draws in a row gave no usable sample; is the data corrupt?"
                    )

        stream = shuffle_buffer(endless(), self.buffer if self.shuffle else 0, rng)
        for batch in islice(bucket_batches(stream, lambda s: s["seconds"], self.spec), quota):
            yield self._collate([{**s, "sample_weight": 1.0} for s in batch], False, counter)

    def _collate(self, samples: list[dict[str, Any]], pad: bool, counter: SkipCounter) -> Any:
        collate = self.collate or partial(collate_samples, pad_id=self.pad_id)
        batch = collate(samples)
        if isinstance(batch, dict):
            batch["pad"] = pad
            batch["skipped"] = counter.take()
        return batch
