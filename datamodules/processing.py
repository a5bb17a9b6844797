"""Processing one recording for ``speechless-prepare``: decode, check, resample, trim, cut.

Every recording is decoded, downmixed, checked, resampled to 16 kHz (``datamodules.audio``) and turned
into one or more speech shard samples (``__key__``, ``flac``, ``json``; see ``datamodules.shards``).
Durations obey ``min_seconds <= min_piece_seconds <= max_seconds / 2`` (checked by
:func:`datamodules.prepare.check_durations`):

- a recording shorter than ``min_seconds`` (default 0.1 s) *after* resampling and trimming is
  skipped as ``too_short`` (a 1-sample 44.1 kHz file resamples to no sample at all, a 3-sample
  8 kHz one to 0.375 ms: no encoder frame, nothing to learn);
- a recording longer than ``max_seconds`` (default 30 s, the encoders' window) is cut at its
  quietest points (:func:`datamodules.audio.split_at_silence`, which searches each window's second
  half) into pieces of at most ``max_seconds`` and at least ``min_piece_seconds`` (default 1 s, or
  ``max_seconds / 2`` when that is less): every piece is therefore long enough to keep, and a
  recording just over the cap can still be cut in two.

A transcript cannot be cut by time, so a piece never carries text it may not contain: pieces have
``text: ""``, ``parent_text`` (the full transcript), ``text_scope: "parent"``, ``parent`` (the
recording's key), ``segment`` and ``offset`` (seconds). Stage 1 (audio only) uses them like any
other sample; stage 2 (text -> tokens) skips a sample without its own ``text`` and counts it
(``piece_without_text``, see :func:`stages.stage2.own_text`) rather than training on an empty
prompt. A tool that aligns a transcript to a piece writes it into the piece's ``text``.

Recordings are processed in worker processes (:func:`process_all`), in input order.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datamodules.audio import (
    TARGET_RATE,
    AudioDecodeError,
    check_audio,
    encode_flac,
    load_audio,
    resample,
    split_at_silence,
    trim_silence,
)
from datamodules.manifests import Item

__all__ = ["Outcome", "ProcessOptions", "process_all", "process_item"]


@dataclass
class ProcessOptions:
    """How every recording is processed (see the module docstring for the durations)."""

    require_text: bool
    max_seconds: float
    min_piece_seconds: float
    min_seconds: float = 0.0
    trim_silence: bool = False


@dataclass
class Outcome:
    """A worker's answer for one input: samples to write, or the reason it was skipped."""

    reason: str | None = None
    detail: str = ""
    samples: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def process_item(item: Item, opts: ProcessOptions) -> Outcome:
    """Decode, check, resample and (when long) split one input; runs in a worker process."""
    if item.error is not None:
        return Outcome(reason=item.error[0], detail=item.error[1])
    if opts.require_text and not item.text:
        return Outcome(reason="missing_text", detail="no transcript (use --no-require-text to keep it)")
    if item.audio is None:
        return Outcome(reason="missing_file", detail="the row has neither audio bytes nor a path")
    try:
        x, rate, notes = load_audio(item.audio, expected_rate=item.sample_rate)
    except FileNotFoundError as err:
        return Outcome(reason="missing_file", detail=str(err))
    except AudioDecodeError as err:
        return Outcome(reason=err.reason, detail=str(err))
    except Exception as err:  # a decoder crash on one file must not end a 100-hour run
        return Outcome(reason="unreadable", detail=f"{type(err).__name__}: {err}")
    reason = check_audio(x, rate)
    if reason is not None:
        return Outcome(reason=reason, detail=f"{len(x)} samples at {rate} Hz")
    out = Outcome()
    meta: dict[str, Any] = {
        "text": item.text or "",
        "language": item.language,
        "speaker": item.speaker,
        "duration": 0.0,
        "source": item.source,
        "sample_rate": TARGET_RATE,
        "orig_sample_rate": rate,
        "channels": notes["channels"],
    }
    if notes.get("rate_mismatch"):
        meta["manifest_sample_rate"] = notes["expected_rate"]
        out.warnings.append(
            ("rate_mismatch", f"manifest says {notes['expected_rate']} Hz, file is {rate} Hz")
        )
    for name, value in item.extra.items():
        meta.setdefault(name, value)
    y = resample(x, rate, TARGET_RATE)
    if opts.trim_silence:
        start, end = trim_silence(y, TARGET_RATE)
        if (start, end) != (0, len(y)):
            meta["trimmed"] = [round(start / TARGET_RATE, 3), round((len(y) - end) / TARGET_RATE, 3)]
            y = y[start:end]
    if len(y) == 0 or len(y) < opts.min_seconds * TARGET_RATE:
        where = "after trimming" if "trimmed" in meta else "at 16 kHz"
        detail = f"{len(y) / TARGET_RATE * 1000:g} ms {where} (minimum {opts.min_seconds:g} s)"
        return Outcome(reason="too_short", detail=detail)
    clipped = int(np.count_nonzero(np.abs(y) > 1.0))
    if clipped:
        out.warnings.append(("clipped", f"{clipped} samples beyond full scale clipped to 16-bit"))
    pieces = split_at_silence(
        y, TARGET_RATE, max_seconds=opts.max_seconds, min_seconds=opts.min_piece_seconds
    )
    if len(pieces) == 1:
        meta["duration"] = len(y) / TARGET_RATE
        out.samples.append((item.key, encode_flac(y), meta))
        return out
    out.warnings.append(("split_long", f"{len(y) / TARGET_RATE:.1f} s cut into {len(pieces)} pieces"))
    for i, (a, b) in enumerate(pieces):
        piece = dict(meta)
        piece.update(
            text="",
            parent_text=item.text or "",
            text_scope="parent",
            parent=item.key,
            segment=i,
            offset=a / TARGET_RATE,
            duration=(b - a) / TARGET_RATE,
            parent_duration=len(y) / TARGET_RATE,
        )
        out.samples.append((f"{item.key}-{i:03d}", encode_flac(y[a:b]), piece))
    return out


_WORKER_OPTS: ProcessOptions | None = None


def _init_worker(opts: ProcessOptions) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts


def _work(item: Item) -> Outcome:
    return process_item(item, _WORKER_OPTS)


def process_all(jobs: Iterable[Item], opts: ProcessOptions, workers: int) -> Iterator[Outcome]:
    """Process jobs in input order, in ``workers`` processes (in this one when ``workers <= 1``)."""
    if workers <= 1:
        for item in jobs:
            yield process_item(item, opts)
        return
    # spawn, not fork: the parent may hold threads (progress bar, torch) that fork would copy mid-lock.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        # Windows of jobs bound memory: imap's feeder would otherwise read every recording up front.
        it = iter(jobs)
        while window := list(itertools.islice(it, workers * 8)):
            yield from pool.imap(_work, window)
