"""Weighted shard sources: several corpora in one split, each repeated or subsampled by its weight.

A split names one source (a folder, index file, glob, brace pattern or list of tars, see
``datamodules.shards.resolve_shards``) or a list of sources, each a plain string (weight 1) or
``{"shards": ..., "weight": w}``::

    train_shards: [{shards: data/twi/fin, weight: 1}, {shards: data/twi/bible, weight: 2.5}]

What a weight means follows the corpus-mixing convention of multilingual speech recipes (e.g.
ESPnet's and Lhotse's per-corpus repeat factors): weight ``w`` multiplies a corpus's natural share,
its number of samples.

* ``epoch_mode: exact``: :func:`epoch_views` gives each sample ``floor(w)`` full copies per epoch plus,
  for the fractional part ``f``, one more copy of a seeded subset of ``round(f * N)`` of the corpus's
  ``N`` samples, drawn anew every epoch. No sample appears more than ``ceil(w)`` times.
* ``epoch_mode: resampled``: a shard is drawn with probability proportional to ``samples * w``, so a
  corpus's expected share of the samples is the one it has in an exact epoch.

Every copy is a "view" of a shard (the shard and the positions it contributes), and the exact-epoch
planner (``datamodules.ranks.plan_exact_epoch``) plans over views as it plans over shards, so the
per-epoch shuffle, the rank and worker split and the padding batches work unchanged. With every
weight 1 the views are the shards themselves and the plan is the single-source plan.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datamodules.pipeline import seeded_rng
from datamodules.shards import ShardIndex, ShardInfo, resolve_shards

__all__ = [
    "ShardSource",
    "ShardSpec",
    "View",
    "check_weights",
    "describe_sources",
    "epoch_views",
    "merge_indexes",
    "parse_sources",
    "repeat_count",
    "resolve_sources",
]

# The type of a ``*_shards`` option: what LightningCLI (jsonargparse) validates in a YAML config.
ShardSpec = str | list[str | dict[str, Any]]


@dataclass(frozen=True)
class ShardSource:
    """One corpus of a split.

    Attributes:
        shards: a folder, index file, glob, brace pattern or list of tars.
        weight: how many times each sample is used per exact epoch (fractions subsample); ``0``
            leaves the corpus out.
    """

    shards: str | tuple[str, ...]
    weight: float = 1.0

    def spec(self) -> str | list[str]:
        """The shard specification as ``resolve_shards`` takes it."""
        return self.shards if isinstance(self.shards, str) else list(self.shards)


@dataclass(frozen=True)
class View:
    """One copy of a shard in an epoch: ``positions`` inside the shard, ``None`` for all of them."""

    shard: int
    positions: tuple[int, ...] | None = None
    copy: int = 0  # 0 for the first full copy (it alone reports samples the index does not list)


def check_weights(weights: Sequence[Any], *, name: str = "shards") -> list[float]:
    """Weights as floats.

    Raises:
        ValueError: a weight that is not a finite number ``>= 0``, or all of them zero.
    """
    out = []
    for i, value in enumerate(weights):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}[{i}]: weight must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}[{i}]: weight must be finite and >= 0, got {value!r}")
        out.append(float(value))
    if out and not any(out):
        raise ValueError(f"{name}: every weight is zero, so an epoch would hold no sample")
    return out


def parse_sources(spec: Any, *, name: str = "shards") -> list[ShardSource]:
    """Normalise a ``*_shards`` option into sources.

    Args:
        spec: a string (one source, weight 1); a list of strings (one source each, weight 1: a list
            of tars is a list of one-tar sources); or a list mixing strings and
            ``{"shards": str | list[str], "weight": float}`` dicts.
        name: the option's name, for error messages.

    Returns:
        The sources in the order given.

    Raises:
        ValueError: an empty list, an entry of another type, unknown dict keys, a weight that is
            not a finite number ``>= 0``, or weights that are all zero.
    """
    if isinstance(spec, (str, os.PathLike)):
        return [ShardSource(str(spec))]
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"{name} must be a shard specification or a non-empty list of them, got {spec!r}")
    sources = []
    for i, entry in enumerate(spec):
        where = f"{name}[{i}]"
        if isinstance(entry, (str, os.PathLike)):
            sources.append(ShardSource(str(entry)))
            continue
        if hasattr(entry, "as_dict"):  # a jsonargparse Namespace
            entry = entry.as_dict()
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a string or {{shards, weight}}, got {entry!r}")
        unknown = set(entry) - {"shards", "weight"}
        if unknown or "shards" not in entry:
            raise ValueError(f"{where} needs 'shards' and an optional 'weight', got keys {sorted(entry)}")
        shards = entry["shards"]
        if isinstance(shards, (list, tuple)) and shards and all(isinstance(s, str) for s in shards):
            shards = tuple(shards)
        elif not isinstance(shards, str):
            raise ValueError(f"{where}: shards must be a string or a list of tars, got {shards!r}")
        sources.append(ShardSource(shards, entry.get("weight", 1.0)))
    check_weights([s.weight for s in sources], name=name)
    return [ShardSource(s.shards, float(s.weight)) for s in sources]


def merge_indexes(indexes: Sequence[ShardIndex]) -> tuple[ShardIndex, list[int]]:
    """Concatenate the sources' indexes (absolute urls) and say which source each shard came from."""
    shards: list[ShardInfo] = []
    source_of: list[int] = []
    for i, index in enumerate(indexes):
        for path, info in zip(index.paths(), index.shards):
            shards.append(ShardInfo(**{**info.__dict__, "url": os.path.abspath(path)}))
            source_of.append(i)
    kind = indexes[0].kind if indexes else "speech"
    return ShardIndex(shards=shards, kind=kind, root="/"), source_of


def repeat_count(weight: float, samples: int) -> int:
    """Samples a corpus of ``samples`` contributes to an exact epoch: ``floor(w) * N + round(f * N)``."""
    whole = math.floor(weight)
    return whole * samples + math.floor((weight - whole) * samples + 0.5)


def epoch_views(
    samples: Sequence[int],
    source_of: Sequence[int],
    weights: Sequence[float],
    *,
    seed: int,
    epoch: int,
) -> list[View]:
    """The shard copies of one exact epoch.

    Args:
        samples: samples per shard.
        source_of: the source of each shard.
        weights: one weight per source.
        seed, epoch: seed the subset drawn for fractional weights (a new subset every epoch).

    Returns:
        Views in source order: ``floor(w)`` full copies of each shard of a source, then the shards'
        parts of its seeded subset of ``round(f * N)`` samples (shards the subset misses are left
        out). With every weight 1, ``[View(0), View(1), ...]``: the shards themselves.
    """
    views: list[View] = []
    for source, weight in enumerate(weights):
        shards = [s for s, src in enumerate(source_of) if src == source]
        whole = math.floor(weight)
        views += [View(s, None, copy) for copy in range(whole) for s in shards]
        total = sum(samples[s] for s in shards)
        extra = repeat_count(weight, total) - whole * total
        if not extra:
            continue
        # A seeded subset of the corpus's samples (not of its shards): the fraction holds per sample.
        chosen = sorted(seeded_rng(seed, epoch, source, "subset").sample(range(total), extra))
        first = 0
        for s in shards:
            lo, hi = bisect_left(chosen, first), bisect_left(chosen, first + samples[s])
            if hi > lo:
                views.append(View(s, tuple(c - first for c in chosen[lo:hi]), whole))
            first += samples[s]
    return views


def resolve_sources(
    spec: Any, tokens: Any = None, *, name: str = "shards", tokens_only: bool = False
) -> tuple[list[ShardIndex], list[ShardIndex] | None, list[float]]:
    """One index per source of a split, the token indexes mirroring them, and the weights.

    Args:
        spec: the split's ``*_shards`` option.
        tokens: its ``token_shards`` entry: one source per source of ``spec``, in the same order
            (basenames are matched within a source, so corpora may share shard names); or one
            source that all of ``spec``'s shards mirror into by basename. When ``spec`` is one
            source, all of ``tokens`` is that source's token shards.
        name: the option's name, for error messages.
        tokens_only: the token shards replace the speech shards (``fields="tokens"``): they are
            returned as the sources, with the weights of ``spec``'s sources.

    Raises:
        ValueError: as :func:`parse_sources`, or token sources that do not pair with the sources.
    """
    sources = parse_sources(spec, name=name)
    weights = [s.weight for s in sources]
    if tokens is not None:
        if isinstance(tokens, str):
            token_indexes = [resolve_shards(tokens)]
        else:
            token_indexes = [
                resolve_shards(s.spec()) for s in parse_sources(tokens, name=f"tokens of {name}")
            ]
        if len(sources) == 1 and len(token_indexes) > 1:
            token_indexes = [merge_indexes(token_indexes)[0]]
        if tokens_only and len(token_indexes) == 1 and set(weights) == {1.0}:
            weights = [1.0]
        elif len(token_indexes) != len(sources) and not (len(token_indexes) == 1 and not tokens_only):
            raise ValueError(
                f"the token shards of {name} name {len(token_indexes)} sources but {name} names "
                f"{len(sources)}; give one token source per speech source, in the same order"
            )
        if tokens_only:
            return token_indexes, None, weights
    # A single string resolves as it always has.
    indexes = [resolve_shards(spec)] if isinstance(spec, str) else [resolve_shards(s.spec()) for s in sources]
    if tokens is None:
        return indexes, None, weights
    # One token folder for several sources: every source's shards mirror into it by name.
    return indexes, token_indexes * len(indexes) if len(token_indexes) == 1 else token_indexes, weights


def describe_sources(spec: Any, *, split: str) -> dict[str, Any]:
    """What a split holds, for provenance: shard urls, sample counts, seconds and hashes.

    With a list of sources, also ``sources``: each source's ``shards``, ``weight``, ``samples``,
    ``seconds`` and ``epoch_samples`` (what one exact epoch uses), and each shard's ``source``.
    """
    if isinstance(spec, str):
        index = resolve_shards(spec)
        return {
            "split": split,
            "spec": spec,
            "samples": index.samples,
            "seconds": round(index.seconds, 3),
            "shards": [
                {"url": path, "samples": info.samples, "seconds": info.seconds, "sha256": info.sha256}
                for path, info in zip(index.paths(), index.shards)
            ],
        }
    sources = parse_sources(spec, name=f"{split}_shards")
    indexes = [resolve_shards(s.spec()) for s in sources]
    index, source_of = merge_indexes(indexes)
    return {
        "split": split,
        "spec": [{"shards": s.spec(), "weight": s.weight} for s in sources],
        "samples": index.samples,
        "seconds": round(index.seconds, 3),
        "shards": [
            {"url": p, "samples": i.samples, "seconds": i.seconds, "sha256": i.sha256, "source": src}
            for p, i, src in zip(index.paths(), index.shards, source_of)
        ],
        "sources": [
            {
                "shards": s.spec(),
                "weight": s.weight,
                "samples": idx.samples,
                "seconds": round(idx.seconds, 3),
                "epoch_samples": repeat_count(s.weight, idx.samples),
            }
            for s, idx in zip(sources, indexes)
        ],
    }
