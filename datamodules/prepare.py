"""``speechless-prepare``: turn transcribed recordings into speech shards (audio in -> shards out).

Inputs are a folder with a manifest (TSV or JSONL) or a Hugging Face ``datasets`` dataset (saved with
``save_to_disk`` or loaded by name). Every recording is decoded, downmixed, checked, resampled to
16 kHz and written as a WebDataset sample following the speech shard contract of
``../shared/DESIGN.md`` (``datamodules.shards``): ``__key__``, ``flac`` (16 kHz mono PCM_16) and
``json`` (``text``, ``language``, ``speaker``, ``duration``, ``source``, ...), one shard folder per
split, ``<out>/<split>/<split>-NNNNNN.tar`` plus ``index.json``.

Durations (``--max-seconds``, ``--min-seconds``, ``--min-piece-seconds``) obey
``min_seconds <= min_piece_seconds <= max_seconds / 2``, with ``max_seconds`` in [1, 120] s:

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

Nothing is dropped silently: every input is either kept or skipped with one reason, the first that
applies in this order: ``bad_manifest_row``, ``missing_text``, ``missing_file`` (no such path, or a
link to nothing), ``not_a_file`` (a directory, device, fifo or socket, or a link to one: never
opened, so a link to ``/dev/zero`` is not read), ``unreadable``, ``empty`` (zero bytes or zero
samples), ``non_finite``, ``silent``, ``too_short``. Warnings on kept inputs are counted the same way:
``rate_mismatch`` (the file header's rate is used; the manifest's claim is kept in the sample's json
as ``manifest_sample_rate``), ``clipped`` (resampling overshoot beyond full scale), ``split_long``,
``duplicate_key`` (a repeated id or stem gets ``_1``, ``_2``, ... in input order). The summary is
printed and written to ``<out>/prepare_summary.json``; every skipped input is listed in
``<out>/prepare_skipped.tsv``.

Exit status: 0 when every input was kept, 3 when any input was skipped (the shards are still
complete and valid for the rest), 2 for usage errors, before any input is read: a numeric option
that is not a finite number in its range (see ``--help``; the same checks raise
:class:`PrepareError` from :func:`prepare`), durations that break the rule above, an unreadable
manifest, missing columns.

Examples::

    speechless-prepare --manifest ../shared/data/fsdd/manifest.tsv --out data/fsdd/shards
    speechless-prepare --hf-dataset data/twi_hf --hf-split train --language tw --out data/twi/shards
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import numbers
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
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
from datamodules.shards import INDEX_NAME, ShardWriter, atomic_write_text

__all__ = [
    "EXIT_OK",
    "EXIT_SKIPPED",
    "EXIT_USAGE",
    "Item",
    "PrepareError",
    "PrepareSummary",
    "build_parser",
    "check_durations",
    "main",
    "min_piece_default",
    "parse_size",
    "prepare",
    "print_summary",
    "read_hf_dataset",
    "read_manifest",
    "sanitize_key",
]

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
SUMMARY_NAME = "prepare_summary.json"
SKIPPED_NAME = "prepare_skipped.tsv"
MAX_EXAMPLES = 5
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FIELDS = ("audio", "text", "speaker", "language", "id", "split")
MIN_PIECE_SECONDS = 1.0
# Sane ranges of the numeric options, (low, high) inclusive; also what --help states. max_seconds:
# below 1 s the cutter (which cuts in a window's second half) leaves pieces shorter than many words;
# above 120 s (four 30 s encoder windows) a sample is far longer than what stage 2 learns to generate
# (the real config stops at 750 frames, 30 s). The other duration bounds follow from
# min_seconds <= min_piece_seconds <= max_seconds / 2 (see check_durations).
RANGES: dict[str, tuple[float, float]] = {
    "max_seconds": (1.0, 120.0),
    "min_seconds": (0.0, 60.0),
    "min_piece_seconds": (0.0, 60.0),
    "max_samples": (1, 1_000_000),
    "max_bytes": (10**6, 64 * 1024**3),  # 1 MB to 64 GiB per shard
    "workers": (1, 256),
}


class PrepareError(Exception):
    """A usage problem that stops the run before any input is processed (exit status 2)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(name: str, value: float) -> str:
    if name == "max_bytes":
        return "1MB" if value == 10**6 else "64GiB" if value == 64 * 1024**3 else str(value)
    return f"{value:g} s" if "seconds" in name else f"{value:g}"


def _range_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``name`` (see :data:`RANGES`), or ``None`` when it is."""
    lo, hi = RANGES[name]
    integer = isinstance(lo, int)
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    if not number or (integer and not float(value).is_integer()):
        return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
    if not math.isfinite(value) or not lo <= value <= hi:
        return f"must be between {_shown(name, lo)} and {_shown(name, hi)}, got {value!r}"
    return None


def _check_range(name: str, value: Any) -> Any:
    problem = _range_problem(name, value)
    if problem:
        raise PrepareError(f"{_flag(name)} {problem}")
    return value


def min_piece_default(max_seconds: float, min_seconds: float = 0.1) -> float:
    """The shortest piece a cut leaves when not given: 1 s, or less to fit ``max_seconds / 2``.

    Never below ``min_seconds`` (a piece is never ``too_short``); :func:`check_durations` refuses
    the settings where that exceeds ``max_seconds / 2``.
    """
    return max(min_seconds, min(MIN_PIECE_SECONDS, max_seconds / 2))


def check_durations(max_seconds: float, min_seconds: float, min_piece_seconds: float | None) -> float:
    """Check ``min_seconds <= min_piece_seconds <= max_seconds / 2`` and each option's range.

    Why: :func:`datamodules.audio.split_at_silence` cuts in the second half of each window, so a
    recording just over ``max_seconds`` can only be cut in two when pieces may be half the cap; a
    piece shorter than ``min_seconds`` would be kept though a whole recording that short is not.

    Returns:
        ``min_piece_seconds``, or :func:`min_piece_default` when it is ``None``.

    Raises:
        PrepareError: a value out of range, not finite, or breaking the rule (the message says which).
    """
    _check_range("max_seconds", max_seconds)
    _check_range("min_seconds", min_seconds)
    if min_seconds > max_seconds / 2:
        raise PrepareError(
            f"--min-seconds {min_seconds:g} is more than half of --max-seconds {max_seconds:g}: a "
            f"recording just over {max_seconds:g} s could not be cut into pieces that long "
            f"(use --max-seconds {2 * min_seconds:g} or more)"
        )
    if min_piece_seconds is None:
        return min_piece_default(max_seconds, min_seconds)
    _check_range("min_piece_seconds", min_piece_seconds)
    if min_piece_seconds < min_seconds:
        raise PrepareError(
            f"--min-piece-seconds {min_piece_seconds:g} is less than --min-seconds {min_seconds:g}: "
            "pieces of long recordings would be shorter than the shortest recording kept"
        )
    if min_piece_seconds > max_seconds / 2:
        raise PrepareError(
            f"--min-piece-seconds {min_piece_seconds:g} is more than half of --max-seconds "
            f"{max_seconds:g}: a recording just over {max_seconds:g} s could not be cut into pieces that "
            f"long (use --max-seconds {2 * min_piece_seconds:g} or more)"
        )
    return min_piece_seconds


@dataclass
class Item:
    """One input recording's metadata; ``audio`` is a path or the encoded bytes.

    ``error`` is ``(reason, detail)`` for an input already known to be unusable (a malformed
    manifest row); it is still counted, so every input ends up kept or skipped with a reason.
    """

    key: str
    source: str
    split: str
    audio: str | bytes | None
    text: str | None
    speaker: str
    language: str
    sample_rate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


def sanitize_key(name: str) -> str:
    """A WebDataset key from a name: runs of characters other than ``[A-Za-z0-9_-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "item"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _make_item(
    row: dict[str, Any], *, where: str, audio: Any, columns: dict[str, str], defaults: dict[str, str]
) -> Item:
    """Build an :class:`Item` from one manifest row or dataset row (``audio`` already resolved)."""
    c = columns
    name = _text(row.get(c["id"])) or (Path(audio).stem if isinstance(audio, str) and audio else where)
    item = Item(
        key=sanitize_key(name),
        source=audio if isinstance(audio, str) and audio else where,
        split=_text(row.get(c["split"])) or defaults["split"],
        audio=audio,
        text=_text(row.get(c["text"])),
        speaker=_text(row.get(c["speaker"])) or defaults["speaker"],
        language=_text(row.get(c["language"])) or defaults["language"],
    )
    known = {c[f] for f in _FIELDS} | {"sample_rate"}
    for name, value in row.items():
        if name not in known and isinstance(value, (str, int, float, bool)) and value != "":
            item.extra[name] = value
    rate = _text(row.get("sample_rate"))
    try:
        item.sample_rate = int(float(rate)) if rate else None
    except ValueError:
        item.error = ("bad_manifest_row", f"{where}: sample_rate {rate!r} is not a number")
    if not _SPLIT_NAME.match(item.split):
        item.error = ("bad_manifest_row", f"{where}: split {item.split!r} is not [A-Za-z0-9_-]+")
    return item


def read_manifest(
    path: str | os.PathLike, *, columns: dict[str, str], defaults: dict[str, str], require_text: bool
) -> list[Item]:
    """Read a TSV (header row, tab-separated, no quoting) or JSONL manifest into items.

    Audio paths are relative to the manifest's folder (absolute ones are kept). Malformed rows become
    items with ``error=("bad_manifest_row", ...)`` so they are counted, not lost.

    Raises:
        PrepareError: the manifest is missing or unreadable, or lacks the audio (or, with
            ``require_text``, the text) column.
    """
    path = Path(path)
    folder = os.path.dirname(os.fspath(path))
    try:
        if path.exists() and not path.is_file():  # a directory, or /dev/zero, which would never end
            raise PrepareError(f"manifest {path} is not a regular file")
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PrepareError(f"cannot read manifest {path}: {err}") from err
    rows: list[tuple[str, dict[str, Any] | None, str]] = []  # (where, row or None, error detail)
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(
                    (f"{path}:{n}", row, "")
                    if isinstance(row, dict)
                    else (f"{path}:{n}", None, "not an object")
                )
            except json.JSONDecodeError as err:
                rows.append((f"{path}:{n}", None, f"invalid JSON ({err})"))
    else:
        if not lines:
            raise PrepareError(f"manifest {path} is empty (a header row is required)")
        header = lines[0].split("\t")
        if columns["audio"] not in header:
            raise PrepareError(f"manifest {path} has no {columns['audio']!r} column (header: {header})")
        if require_text and columns["text"] not in header:
            raise PrepareError(f"manifest {path} has no {columns['text']!r} column; pass --no-require-text")
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(header):
                rows.append((f"{path}:{n}", None, f"{len(cells)} fields, header has {len(header)}"))
            else:
                rows.append((f"{path}:{n}", dict(zip(header, cells)), ""))
    items = []
    for where, row, problem in rows:
        rel = _text((row or {}).get(columns["audio"]))
        audio = os.path.normpath(os.path.join(folder, rel)) if rel else None
        item = _make_item(row or {}, where=where, audio=audio, columns=columns, defaults=defaults)
        if row is None or rel is None:
            item.error = ("bad_manifest_row", f"{where}: {problem or 'no audio path'}")
        items.append(item)
    return items


def read_hf_dataset(
    name: str,
    *,
    splits: str | None,
    config: str | None,
    columns: dict[str, str],
    defaults: dict[str, str],
    require_text: bool,
) -> tuple[list[Item], Iterator[str | bytes | None]]:
    """Read a Hugging Face dataset's metadata, and a stream of its audio in the same order.

    The audio column is cast to ``datasets.Audio(decode=False)`` (``datasets`` 4+ decodes through
    torchcodec, which this project does not need): the stream yields each row's encoded bytes, or
    its path when the dataset stores paths only, and :func:`datamodules.audio.load_audio` decodes it.
    Metadata is read first without the audio so keys are known before any audio is loaded.

    Args:
        name: a ``save_to_disk`` folder, or a dataset name for ``datasets.load_dataset``.
        splits: comma-separated dataset splits (default: all); for a one-split dataset, the output
            split's name.

    Raises:
        PrepareError: the dataset cannot be loaded or lacks the audio (or required text) column.
    """
    import datasets

    wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else []
    try:
        if os.path.isdir(name):
            obj = datasets.load_from_disk(name)
        elif wanted:  # load only the named splits, not the whole dataset
            obj = datasets.DatasetDict({s: datasets.load_dataset(name, config, split=s) for s in wanted})
        else:
            obj = datasets.load_dataset(name, config)
    except Exception as err:
        raise PrepareError(f"cannot load dataset {name!r}: {type(err).__name__}: {err}") from err
    if isinstance(obj, datasets.Dataset):
        if len(wanted) > 1:
            raise PrepareError(f"{name!r} is a single dataset; --hf-split names its one output split")
        parts = {(wanted or [defaults["split"]])[0]: obj}
    else:
        missing = [s for s in wanted if s not in obj]
        if missing:
            raise PrepareError(f"dataset {name!r} has no split(s) {missing}; it has {list(obj.keys())}")
        parts = {s: obj[s] for s in wanted or obj.keys()}
    audio_col = columns["audio"]
    items: list[Item] = []
    for split, ds in list(parts.items()):
        feature = ds.features.get(audio_col)
        if isinstance(feature, datasets.Audio):
            ds = parts[split] = ds.cast_column(audio_col, datasets.Audio(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype == "string"):
            raise PrepareError(
                f"dataset {name!r} [{split}] has no audio column {audio_col!r} (Audio or path strings)"
            )
        if require_text and columns["text"] not in ds.column_names:
            raise PrepareError(
                f"dataset {name!r} [{split}] has no {columns['text']!r} column; pass --no-require-text"
            )
        meta = ds.remove_columns([audio_col])
        paths = (p for batch in _audio_batches(ds, audio_col, paths_only=True) for p in batch)
        for row_index, (row, path) in enumerate(zip(meta, paths, strict=True)):
            where = f"{name}:{split}:{row_index}"
            item = _make_item(
                row, where=where, audio=path, columns=columns, defaults={**defaults, "split": split}
            )
            item.source, item.audio = where if not path else f"{where}:{path}", None
            items.append(item)

    def stream() -> Iterator[str | bytes | None]:
        for ds in parts.values():
            for batch in _audio_batches(ds, audio_col, paths_only=False):
                yield from batch

    return items, stream()


def _audio_batches(ds: Any, column: str, *, paths_only: bool, size: int = 64) -> Iterator[list[Any]]:
    """Yield the audio column in batches: each row's path (``paths_only``), else its bytes or path."""
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=size):
        values = table.column(column).to_pylist()
        for i, v in enumerate(values):
            if isinstance(v, dict):  # Audio(decode=False) rows are {"bytes": ..., "path": ...}
                values[i] = v.get("path") if paths_only or not v.get("bytes") else v["bytes"]
        yield values


@dataclass
class PrepareSummary:
    """What a run kept and skipped; ``to_json()`` is what ``prepare_summary.json`` holds.

    ``inputs == kept + sum(skipped.values())`` always; ``samples >= kept`` (long recordings give
    several samples). ``splits`` maps a split to ``{"inputs", "kept", "samples", "seconds", "shards"}``.
    Examples are up to five ``{"source", "detail"}`` per reason.
    """

    out: str
    inputs: int = 0
    kept: int = 0
    samples: int = 0
    seconds: float = 0.0
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    warning_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_SKIPPED if sum(self.skipped.values()) else EXIT_OK

    def _count(self, counts: dict, examples: dict, reason: str, source: str, detail: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        shown = examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append({"source": source, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "inputs": self.inputs,
            "kept": self.kept,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "splits": self.splits,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": dict(sorted(self.skipped_examples.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "warning_examples": dict(sorted(self.warning_examples.items())),
        }


@dataclass
class _Options:
    require_text: bool
    max_seconds: float
    min_piece_seconds: float
    min_seconds: float = 0.0
    trim_silence: bool = False


@dataclass
class _Outcome:
    """A worker's answer for one input: samples to write, or the reason it was skipped."""

    reason: str | None = None
    detail: str = ""
    samples: list[tuple[str, bytes, dict[str, Any]]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _process(item: Item, opts: _Options) -> _Outcome:
    """Decode, check, resample and (when long) split one input; runs in a worker process."""
    if item.error is not None:
        return _Outcome(reason=item.error[0], detail=item.error[1])
    if opts.require_text and not item.text:
        return _Outcome(reason="missing_text", detail="no transcript (use --no-require-text to keep it)")
    if item.audio is None:
        return _Outcome(reason="missing_file", detail="the row has neither audio bytes nor a path")
    try:
        x, rate, notes = load_audio(item.audio, expected_rate=item.sample_rate)
    except FileNotFoundError as err:
        return _Outcome(reason="missing_file", detail=str(err))
    except AudioDecodeError as err:
        return _Outcome(reason=err.reason, detail=str(err))
    except Exception as err:  # a decoder crash on one file must not end a 100-hour run
        return _Outcome(reason="unreadable", detail=f"{type(err).__name__}: {err}")
    reason = check_audio(x, rate)
    if reason is not None:
        return _Outcome(reason=reason, detail=f"{len(x)} samples at {rate} Hz")
    out = _Outcome()
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
        return _Outcome(reason="too_short", detail=detail)
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


_WORKER_OPTS: _Options | None = None


def _init_worker(opts: _Options) -> None:
    global _WORKER_OPTS
    _WORKER_OPTS = opts


def _work(item: Item) -> _Outcome:
    return _process(item, _WORKER_OPTS)


def _outcomes(jobs: Iterable[Item], opts: _Options, workers: int) -> Iterator[_Outcome]:
    """Process jobs in input order, in ``workers`` processes (in this one when ``workers <= 1``)."""
    if workers <= 1:
        for item in jobs:
            yield _process(item, opts)
        return
    # spawn, not fork: the parent may hold threads (progress bar, torch) that fork would copy mid-lock.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(opts,)) as pool:
        # Windows of jobs bound memory: imap's feeder would otherwise read every recording up front.
        it = iter(jobs)
        while window := list(itertools.islice(it, workers * 8)):
            yield from pool.imap(_work, window)


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 0
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def prepare(
    *,
    out: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    hf_dataset: str | None = None,
    hf_split: str | None = None,
    hf_config: str | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    speaker_column: str = "speaker",
    language_column: str = "language",
    id_column: str = "id",
    split_column: str = "split",
    split: str = "train",
    language: str | None = None,
    speaker: str | None = None,
    require_text: bool = True,
    max_samples: int = 1000,
    max_bytes: int = 256 * 1024**2,
    max_seconds: float = 30.0,
    min_seconds: float = 0.1,
    min_piece_seconds: float | None = None,
    trim_silence: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Prepare speech shards from a manifest or a Hugging Face dataset.

    Args:
        out: output folder; shards go to ``<out>/<split>/``.
        manifest: a ``.tsv`` (header row) or ``.jsonl`` manifest; ``audio`` paths are relative to its
            folder. Exactly one of ``manifest`` and ``hf_dataset``.
        hf_dataset: a folder written by ``save_to_disk`` or a dataset name for ``load_dataset``.
        hf_split: the dataset split(s) to read, comma-separated (default: all of them).
        hf_config: the dataset configuration name (``load_dataset`` only).
        audio_column, text_column, speaker_column, language_column, id_column, split_column: the
            column (manifest field) names.
        split: the output split for inputs without a split column (for HF: the one-split dataset's).
        language, speaker: values for inputs whose column is absent or empty (else ``und`` and
            ``unknown``).
        require_text: skip inputs without a transcript (``missing_text``).
        max_samples, max_bytes: shard size caps (1 to 10^6 samples, 1MB to 64GiB).
        max_seconds: longer recordings are cut at silence into pieces at most this long (1 to 120).
        min_seconds: shorter recordings (after resampling and trimming) are skipped as
            ``too_short``; 0 to ``max_seconds / 2``.
        min_piece_seconds: the shortest piece such a cut leaves, ``min_seconds`` to
            ``max_seconds / 2`` (default: :func:`min_piece_default`, 1 s or half of ``max_seconds``).
        trim_silence: cut leading and trailing silence (frames 35 dB below the loudest, 50 ms kept);
            the cut seconds are recorded as ``trimmed: [head, tail]``. Off by default.
        workers: processes decoding in parallel, 1 to 256 (default: every CPU core).
        progress: show a progress bar on stderr.

    Returns:
        The :class:`PrepareSummary`, also written to ``<out>/prepare_summary.json``.

    Raises:
        PrepareError: a usage problem (no or two sources, a numeric option out of its range or
            breaking ``min_seconds <= min_piece_seconds <= max_seconds / 2``, unreadable manifest,
            missing columns).
    """
    if (manifest is None) == (hf_dataset is None):
        raise PrepareError("give exactly one source: a manifest or a Hugging Face dataset")
    _check_range("max_samples", max_samples)
    _check_range("max_bytes", max_bytes)
    if workers is not None:
        _check_range("workers", workers)
    min_piece_seconds = check_durations(max_seconds, min_seconds, min_piece_seconds)
    defaults = {"split": split, "language": language or "und", "speaker": speaker or "unknown"}
    columns = {
        "audio": audio_column,
        "text": text_column,
        "speaker": speaker_column,
        "language": language_column,
        "id": id_column,
        "split": split_column,
    }
    if manifest is not None:
        items = read_manifest(manifest, columns=columns, defaults=defaults, require_text=require_text)
        audio_stream = None
    else:
        items, audio_stream = read_hf_dataset(
            hf_dataset,
            splits=hf_split,
            config=hf_config,
            columns=columns,
            defaults=defaults,
            require_text=require_text,
        )
    out = Path(out)
    summary = PrepareSummary(out=str(out), inputs=len(items))
    used: set[str] = set()
    for item in items:
        base, item.key = item.key, _unique(item.key, used)
        if item.key != base:
            summary._count(summary.warnings, summary.warning_examples, "duplicate_key", item.source, item.key)
    split_names = sorted({item.split for item in items if item.error is None})
    # An old index would describe shards this run overwrites; drop it first so an interrupted run
    # leaves a folder that fails to load rather than one that loads inconsistently.
    for name in split_names:
        (out / name / INDEX_NAME).unlink(missing_ok=True)
    (out / SUMMARY_NAME).unlink(missing_ok=True)
    writers = {
        name: ShardWriter(
            out / name, prefix=name, max_samples=max_samples, max_bytes=max_bytes, kind="speech"
        )
        for name in split_names
    }
    for name in split_names:
        summary.splits[name] = {"inputs": 0, "kept": 0, "samples": 0, "seconds": 0.0, "shards": 0}
    skipped_rows: list[str] = []
    opts = _Options(
        require_text=require_text,
        max_seconds=max_seconds,
        min_piece_seconds=min_piece_seconds,
        min_seconds=min_seconds,
        trim_silence=trim_silence,
    )
    workers = min(workers or os.cpu_count() or 1, max(1, len(items)))
    jobs = items if audio_stream is None else _with_audio(items, audio_stream)
    try:
        with _progress_bar(progress) as bar:
            task = bar.add_task("preparing", total=len(items))
            for item, result in zip(items, _outcomes(jobs, opts, workers)):
                _record(item, result, writers, summary, used, skipped_rows)
                bar.advance(task)
    except BaseException as err:
        for writer in writers.values():
            writer.__exit__(type(err), err, err.__traceback__)  # removes the half-written shard
        raise
    for name, writer in writers.items():
        index = writer.close(extra={"prepared_by": "speechless-prepare", "sample_rate": TARGET_RATE})
        summary.splits[name]["shards"] = len(index.shards)
        summary.splits[name]["seconds"] = round(summary.splits[name]["seconds"], 3)
    atomic_write_text(out / SKIPPED_NAME, "source\treason\tdetail\n" + "".join(skipped_rows))
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary.to_json(), indent=1, ensure_ascii=False) + "\n")
    return summary


def _with_audio(items: list[Item], stream: Iterator[Any]) -> Iterator[Item]:
    """Jobs for lazily read sources: copies of the items with their audio attached, in order.

    Copies, so the main process's items keep metadata only while the audio travels to a worker.
    """
    for item, audio in zip(items, stream, strict=True):
        yield item if item.error is not None else replace(item, audio=audio)


def _record(
    item: Item,
    result: _Outcome,
    writers: dict[str, ShardWriter],
    summary: PrepareSummary,
    used: set[str],
    skipped_rows: list[str],
) -> None:
    for kind, detail in result.warnings:
        summary._count(summary.warnings, summary.warning_examples, kind, item.source, detail)
    if result.reason is not None:
        summary._count(summary.skipped, summary.skipped_examples, result.reason, item.source, result.detail)
        clean = [s.replace("\t", " ").replace("\n", " ") for s in (item.source, result.reason, result.detail)]
        skipped_rows.append("\t".join(clean) + "\n")
        if item.split in summary.splits:
            summary.splits[item.split]["inputs"] += 1
        return
    stats = summary.splits[item.split]
    stats["inputs"] += 1
    stats["kept"] += 1
    summary.kept += 1
    for key, flac, meta in result.samples:
        # Piece keys are made in the worker; one may meet a key another input already holds.
        key = key if key == item.key else _unique(key, used)
        writers[item.split].write({"__key__": key, "flac": flac, "json": meta})
        stats["samples"] += 1
        stats["seconds"] += meta["duration"]
        summary.samples += 1
        summary.seconds += meta["duration"]


def _progress_bar(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def print_summary(summary: PrepareSummary, *, file: Any = None) -> None:
    """Print the kept/skipped/warning tables of a run."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=120)
    kept = Table(title=f"speechless-prepare -> {summary.out}")
    for name in ("split", "inputs", "kept", "samples", "hours", "shards"):
        kept.add_column(name, justify="left" if name == "split" else "right")
    for name, s in summary.splits.items():
        kept.add_row(
            name,
            str(s["inputs"]),
            str(s["kept"]),
            str(s["samples"]),
            f"{s['seconds'] / 3600:.3f}",
            str(s["shards"]),
        )
    kept.add_row(
        "all",
        str(summary.inputs),
        str(summary.kept),
        str(summary.samples),
        f"{summary.seconds / 3600:.3f}",
        "",
    )
    console.print(kept)
    for title, counts, examples in (
        ("skipped", summary.skipped, summary.skipped_examples),
        ("warnings (kept)", summary.warnings, summary.warning_examples),
    ):
        if not counts:
            continue
        table = Table(title=title)
        for name in ("reason", "count", "examples"):
            table.add_column(name)
        for reason, count in sorted(counts.items()):
            shown = "\n".join(e["source"] for e in examples.get(reason, []))
            table.add_row(reason, str(count), shown)
        console.print(table)


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``"256MB"`` (10^6), ``"256MiB"`` (2^20), ``"1G"``, ``"1000"``."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 256MB, 1GiB or a byte count)")
    number, unit, binary = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _option(name: str, parse: Any = float) -> Any:
    """An argparse ``type`` for option ``name``: ``parse``, then the range check of :data:`RANGES`."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError as err:
            kind = "an integer" if parse is int else "a number" if parse is float else None
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}" if kind else str(err)) from None
        problem = _range_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The ``speechless-prepare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="speechless-prepare",
        description="Decode, check, resample (16 kHz mono) and shard transcribed speech.",
        epilog="Exit status: 0 all inputs kept; 3 some inputs skipped (see prepare_summary.json); 2 usage error.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--manifest", help="TSV (header: audio, text, speaker, language[, split, sample_rate, id]) or JSONL"
    )
    src.add_argument("--hf-dataset", help="a save_to_disk folder or a Hugging Face dataset name")
    p.add_argument("--out", required=True, help="output folder; shards go to <out>/<split>/")
    p.add_argument("--hf-split", help="dataset split(s) to read, comma-separated (default: all)")
    p.add_argument("--hf-config", help="dataset configuration name (load_dataset only)")
    for name in ("audio", "text", "speaker", "language", "id", "split"):
        p.add_argument(f"--{name}-column", default=name, help=f"column holding the {name} (default: {name})")
    p.add_argument(
        "--split", default="train", help="split for inputs without a split column (default: train)"
    )
    p.add_argument("--language", help="language for inputs without one (default: und)")
    p.add_argument("--speaker", help="speaker for inputs without one (default: unknown)")
    p.add_argument(
        "--require-text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip inputs without a transcript (default: on)",
    )
    p.add_argument(
        "--max-samples",
        type=_option("max_samples", int),
        default=1000,
        help="samples per shard, 1 to 10^6 (default: 1000)",
    )
    p.add_argument(
        "--max-bytes",
        type=_option("max_bytes", parse_size),
        default=256 * 1024**2,
        help="bytes per shard, 1MB to 64GiB (default: 256MiB)",
    )
    p.add_argument(
        "--max-seconds",
        type=_option("max_seconds"),
        default=30.0,
        help="longer audio is cut at silence into pieces at most this long; 1 to 120 (default: 30)",
    )
    p.add_argument(
        "--min-seconds",
        type=_option("min_seconds"),
        default=0.1,
        help="shorter audio (after resampling and trimming) is skipped as too_short; 0 to half of "
        "--max-seconds (default: 0.1)",
    )
    p.add_argument(
        "--min-piece-seconds",
        type=_option("min_piece_seconds"),
        default=None,
        help="the shortest piece a cut leaves; --min-seconds to half of --max-seconds "
        "(default: 1, or half of --max-seconds when that is less)",
    )
    p.add_argument(
        "--trim-silence",
        action="store_true",
        help="cut leading/trailing silence (35 dB below the peak frame)",
    )
    p.add_argument(
        "--workers",
        type=_option("workers", int),
        help="decoding processes, 1 to 256 (default: all CPU cores)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``speechless-prepare``; returns the exit status (0 ok, 3 inputs skipped, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:  # rules between options are usage errors too, reported the argparse way
            args.min_piece_seconds = check_durations(
                args.max_seconds, args.min_seconds, args.min_piece_seconds
            )
        except PrepareError as err:
            parser.error(str(err))
    except SystemExit as exit_:  # argparse exits 2 on bad usage and 0 after --help
        return int(exit_.code or 0)
    try:
        summary = prepare(**vars(args))  # the parser's destinations are prepare's keywords
    except PrepareError as err:
        print(f"speechless-prepare: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print_summary(summary)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
