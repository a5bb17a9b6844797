"""Generator stages over WebDataset shards: the one reader and decoder of every shard format.

The stages follow WebDataset's (and WhisperSpeech's) style: small generators with explicit sample
keys, composed by the dataset in ``datamodules/shard_dataset.py``::

    read_shard -> decode_sample -> shuffle_buffer -> bucket_batches -> collate_samples

Two epoch modes share them:

* ``exact``: :func:`datamodules.ranks.plan_exact_epoch` turns the shard index alone (per-sample ``durations``, see
  ``datamodules/shards.py``) into the same plan on every rank and worker: which shard positions each
  ``(rank, worker)`` slot reads, how they are batched, and how many padding batches each slot adds so
  that every rank yields the same number of batches (DDP's gradient all-reduce never waits on a rank
  that ran out). :func:`datamodules.ranks.assemble_planned` then routes the decoded samples into the planned batches.
* ``resampled``: an endless, seeded stream of shards drawn with replacement, cut to a fixed batch
  count per rank (the caller does the cutting).

Batches are sized by padded audio seconds (``len(batch) * longest``) in length buckets, the way
speech toolkits (ESPnet's ``numel`` batches, Lhotse's ``DynamicBucketingSampler``) keep GPU memory
flat across short and long utterances.

Readers that hold a split in memory (stage 3's instructions, evaluation recordings) go through the
same :func:`read_shard` and :func:`decode_sample` (:func:`read_decoded`), so each shard format has one
reader.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import torch

from datamodules.shards import iter_tar_samples, resolve_shards

__all__ = [
    "SHARD_READ_ERRORS",
    "BatchSpec",
    "SampleError",
    "SkipCounter",
    "bucket_batches",
    "collate_samples",
    "decode_sample",
    "read_decoded",
    "read_recordings",
    "read_shard",
    "seeded_rng",
    "shuffle_buffer",
]

log = logging.getLogger(__name__)

# Errors after which a tar cannot be read further (truncated, not a tar, gone).
SHARD_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, OSError, EOFError)


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SkipCounter:
    """Counts skipped samples by reason; logs the first of each reason and hands out deltas.

    ``take()`` returns the counts since the previous ``take()``, so a LightningModule that sums the
    ``skipped`` dicts of its batches gets the total over all workers without double counting.
    """

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._delta: Counter[str] = Counter()

    def note(self, reason: str, key: str = "?", detail: str = "") -> None:
        if not self.total[reason]:
            log.warning(
                "skipping sample %s (%s%s); further skips of this kind are only counted",
                key,
                reason,
                f": {detail}" if detail else "",
            )
        self.total[reason] += 1
        self._delta[reason] += 1

    def take(self) -> dict[str, int]:
        delta, self._delta = dict(self._delta), Counter()
        return delta


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (str seeds hash with SHA-512: stable across runs)."""
    return random.Random("/".join(str(p) for p in parts))


# ----------------------------------------------------------------------------- reading and decoding


def read_shard(path: str, token_path: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(position, raw sample)`` from one shard, joined with its token shard by ``__key__``.

    Args:
        path: the tar to read.
        token_path: an optional tar that mirrors ``path`` sample by sample (same keys, same order);
            its members are merged into each sample (its ``json`` wins: it adds ``n_frames``).

    Raises:
        ValueError: the two shards disagree on a key or on their length.
    """
    main = iter_tar_samples(path)
    if token_path is None:
        yield from enumerate(main)
        return
    other = iter_tar_samples(token_path)
    for pos, sample in enumerate(main):
        extra = next(other, None)
        if extra is None:
            raise ValueError(f"{token_path} ends at sample {pos}, before {path} (key {sample['__key__']!r})")
        if extra["__key__"] != sample["__key__"]:
            raise ValueError(
                f"key mismatch at sample {pos}: {path} has {sample['__key__']!r}, "
                f"{token_path} has {extra['__key__']!r}; token shards must mirror their speech shards"
            )
        yield pos, {**sample, **extra}  # the token json is the speech json plus n_frames
    if next(other, None) is not None:
        raise ValueError(f"{token_path} has more samples than {path}")


def decode_sample(raw: dict[str, Any], *, fields: str, sample_rate: int, frame_rate: float) -> dict[str, Any]:
    """Decode one raw sample into ``{"__key__", "meta", "seconds", "audio"?, "codes"?}``.

    Args:
        raw: ``{"__key__": str, ext: bytes}`` as :func:`read_shard` yields it.
        fields: ``"audio"`` (needs ``flac``), ``"tokens"`` (needs ``codes.npy``), ``"both"``, or
            ``"states"`` (cached encoder states ``states.npy`` ``[T, D]``, stage 1's fast path).
        sample_rate: the rate every ``flac`` must have (shards are prepared at 16 kHz).
        frame_rate: token frames per second, for token samples whose json has no ``duration``.

    Returns:
        ``audio`` as float32 ``[N]`` (stereo is averaged to mono), ``codes`` as int64 ``[Q, T]``,
        ``meta`` the json dict and ``seconds`` the sample's length.

    Raises:
        SampleError: a missing or undecodable member.
    """
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise SampleError("missing_json")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "not an object")
    out: dict[str, Any] = {"__key__": key, "meta": meta}
    if fields in ("audio", "both"):
        if "flac" not in raw:
            raise SampleError("missing_flac")
        try:
            audio, rate = soundfile.read(io.BytesIO(raw["flac"]), dtype="float32")
        except Exception as e:  # libsndfile raises several types for corrupt data
            raise SampleError("bad_flac", str(e)) from None
        if rate != sample_rate:
            raise SampleError("bad_rate", f"{rate} Hz, expected {sample_rate}")
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        if audio.size == 0:
            raise SampleError("empty_audio")
        out["audio"] = np.ascontiguousarray(audio, dtype=np.float32)
        out["seconds"] = audio.shape[0] / sample_rate
    if fields == "states":
        if "states.npy" not in raw:
            raise SampleError("missing_states")
        try:
            states = np.load(io.BytesIO(raw["states.npy"]), allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/EOFError on bad headers
            raise SampleError("bad_states", str(e)) from None
        if states.ndim != 2 or states.dtype.kind != "f" or states.shape[0] == 0:
            raise SampleError("bad_states", f"expected a non-empty float [T, D] array, got {states.dtype} {states.shape}")
        if not np.isfinite(states).all():
            raise SampleError("bad_states", "non-finite values")
        out["states"] = states
        out["seconds"] = float(meta.get("duration") or states.shape[0] / frame_rate)
    if fields in ("tokens", "both"):
        if "codes.npy" not in raw:
            raise SampleError("missing_codes")
        try:
            codes = np.load(io.BytesIO(raw["codes.npy"]), allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/EOFError on bad headers
            raise SampleError("bad_codes", str(e)) from None
        if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] == 0:
            raise SampleError(
                "bad_codes", f"expected a non-empty integer [Q, T] array, got {codes.dtype} {codes.shape}"
            )
        out["codes"] = codes.astype(np.int64)
        if "seconds" not in out:
            out["seconds"] = float(meta.get("duration") or codes.shape[1] / frame_rate)
    return out


def read_decoded(
    spec: str, *, fields: str, sample_rate: int = 16_000, frame_rate: float = 25.0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every sample of the shards ``spec`` names, in index order, read by :func:`read_shard` and
    decoded by :func:`decode_sample` (as training reads them): ``(shard path, sample)``.

    For readers that hold a whole split in memory (stage 3's instructions, evaluation recordings);
    :class:`datamodules.shard_dataset.ShardDataset` streams the same two stages through its epoch plan.

    Raises:
        SampleError: a sample without json or with an undecodable member.
    """
    for path in resolve_shards(spec).paths():
        for _, raw in read_shard(path):
            yield path, decode_sample(raw, fields=fields, sample_rate=sample_rate, frame_rate=frame_rate)


# ----------------------------------------------------------------------------- shuffling and batching


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (``size <= 1`` keeps the order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class BatchSpec:
    """How samples are grouped into batches.

    Args:
        max_batch_seconds: cap on a batch's padded seconds (``len(batch) * longest``). A single
            sample longer than this still forms a batch of its own: it is never dropped.
        max_batch_size: cap on the number of samples in a batch.
        bucket_boundaries: sample lengths in seconds that separate buckets; samples only share a
            batch with samples of their own bucket (``None``: one bucket).
    """

    max_batch_seconds: float = 120.0
    max_batch_size: int = 64
    bucket_boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_seconds <= 0 or self.max_batch_size < 1:
            raise ValueError("max_batch_seconds must be > 0 and max_batch_size >= 1")
        if list(self.bucket_boundaries) != sorted(self.bucket_boundaries):
            raise ValueError(f"bucket_boundaries must be increasing, got {self.bucket_boundaries}")


def bucket_batches(
    items: Iterable[Any], seconds: Callable[[Any], float], spec: BatchSpec
) -> Iterator[list[Any]]:
    """Group a stream into batches by padded seconds within length buckets; leftovers flush at the end.

    Args:
        items: the stream.
        seconds: an item's length in seconds.
        spec: the limits.

    Yields:
        Lists of items, each with ``len * max(seconds) <= spec.max_batch_seconds`` unless it holds
        a single over-long item, and ``len <= spec.max_batch_size``.
    """
    buckets: dict[int, list[Any]] = {}
    longest: dict[int, float] = {}
    for item in items:
        s = float(seconds(item))
        b = bisect_right(spec.bucket_boundaries, s)
        batch = buckets.setdefault(b, [])
        if batch and (len(batch) + 1) * max(longest[b], s) > spec.max_batch_seconds:
            yield batch
            batch = buckets[b] = []
        if not batch:
            longest[b] = 0.0
        batch.append(item)
        longest[b] = max(longest[b], s)
        if len(batch) >= spec.max_batch_size or len(batch) * longest[b] >= spec.max_batch_seconds:
            yield batch
            buckets[b] = []
    for b in sorted(buckets):
        if buckets[b]:
            yield buckets[b]


def collate_samples(samples: Sequence[dict[str, Any]], *, pad_id: int = -1) -> dict[str, Any]:
    """Pad decoded samples into a batch.

    Args:
        samples: dicts from :func:`decode_sample` plus ``sample_weight`` (1 counted, 0 padding).
        pad_id: fill value for ``codes`` past each sample's length.

    Returns:
        ``keys`` list[str], ``meta`` list[dict], ``sample_weight`` ``[B]`` float32, and when present
        ``audio`` ``[B, N]`` float32 with ``audio_lengths`` ``[B]`` long, ``codes`` ``[B, Q, T]``
        long with ``code_lengths`` ``[B]`` long, ``states`` ``[B, T, D]`` float32 with
        ``state_lengths`` ``[B]`` long.
    """
    batch: dict[str, Any] = {
        "keys": [s["__key__"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "sample_weight": torch.tensor([float(s.get("sample_weight", 1.0)) for s in samples]),
    }
    if "audio" in samples[0]:
        lengths = [s["audio"].shape[0] for s in samples]
        audio = torch.zeros(len(samples), max(lengths), dtype=torch.float32)
        for i, s in enumerate(samples):
            audio[i, : lengths[i]] = torch.from_numpy(s["audio"])
        batch["audio"], batch["audio_lengths"] = audio, torch.tensor(lengths, dtype=torch.long)
    if "states" in samples[0]:
        lengths = [s["states"].shape[0] for s in samples]
        states = torch.zeros(len(samples), max(lengths), samples[0]["states"].shape[1], dtype=torch.float32)
        for i, s in enumerate(samples):
            states[i, : lengths[i]] = torch.from_numpy(s["states"].astype(np.float32))
        batch["states"], batch["state_lengths"] = states, torch.tensor(lengths, dtype=torch.long)
    if "codes" in samples[0]:
        levels = {s["codes"].shape[0] for s in samples}
        if len(levels) != 1:
            raise ValueError(f"samples in one batch have different numbers of codebooks: {sorted(levels)}")
        lengths = [s["codes"].shape[1] for s in samples]
        codes = torch.full((len(samples), levels.pop(), max(lengths)), pad_id, dtype=torch.long)
        for i, s in enumerate(samples):
            codes[i, :, : lengths[i]] = torch.from_numpy(s["codes"])
        batch["codes"], batch["code_lengths"] = codes, torch.tensor(lengths, dtype=torch.long)
    return batch


# Fields preparation adds to the samples of a recording it cut into pieces (datamodules/processing.py);
# not the whole recording's.
PIECE_FIELDS = ("parent", "segment", "offset", "parent_text", "parent_duration", "text_scope")


def read_recordings(spec: str, *, sample_rate: int = 16_000) -> list[dict[str, Any]]:
    """Audio shards -> one item per *recording*, the pieces of a cut recording joined in order.

    ``speechless-prepare`` cuts a recording longer than ``--max-seconds`` into pieces whose json has
    ``parent`` (the recording's key), ``segment`` (0, 1, ...), ``parent_text`` (the transcript: a
    piece's own ``text`` is empty) and ``parent_duration``. Their waveforms are concatenated by
    ``segment`` (the pieces cover the recording exactly), wherever in the shards they lie, and the item
    takes the recording's transcript and key. Samples are decoded by :func:`decode_sample`, as in
    training. Used by stage 3's spoken validation and ``speechless-infer --shards``.

    Returns:
        ``[{"id", "wave" (float32 [N] at ``sample_rate``), "meta" (the recording's json: ``text`` is its
        transcript), "pieces" (how many were joined), "complete" (no piece missing)}]`` in order of
        first appearance.

    Raises:
        SampleError: A sample without json or with undecodable audio.
    """
    items: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = {}
    for _, sample in read_decoded(spec, fields="audio", sample_rate=sample_rate):
        meta, wave = sample["meta"], sample["audio"]
        parent = meta.get("parent") if "segment" in meta else None
        if parent is None:
            items.append({"id": sample["__key__"], "wave": wave, "meta": meta, "pieces": 1, "complete": True})
            continue
        if parent not in groups:
            whole = {k: v for k, v in meta.items() if k not in PIECE_FIELDS}
            whole.update(text=meta.get("parent_text") or "", duration=meta.get("parent_duration"))
            groups[parent] = {"id": str(parent), "meta": whole, "parts": {}, "expect": meta.get("parent_duration")}
            items.append(groups[parent])
        groups[parent]["parts"][int(meta.get("segment", 0))] = wave
    for group in groups.values():
        parts = group.pop("parts")
        expect = group.pop("expect")
        group["wave"] = np.concatenate([parts[i] for i in sorted(parts)])
        group["pieces"] = len(parts)
        seconds = len(group["wave"]) / sample_rate
        group["complete"] = sorted(parts) == list(range(len(parts))) and (
            expect is None or abs(seconds - float(expect)) < 0.05)  # fmt: skip
    return items
