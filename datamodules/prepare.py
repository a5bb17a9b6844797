"""``speechless-prepare``: turn transcribed recordings into speech shards (audio in -> shards out).

Inputs are a folder with a manifest (TSV or JSONL) or a Hugging Face ``datasets`` dataset (saved with
``save_to_disk`` or loaded by name), read by ``datamodules/manifests.py``. Every recording is decoded,
downmixed, checked, resampled to 16 kHz, trimmed and cut when long (``datamodules/processing.py``) and
written as a WebDataset sample following the speech shard contract of ``../shared/DESIGN.md``
(``datamodules.shards``): ``__key__``, ``flac`` (16 kHz mono PCM_16) and ``json`` (``text``,
``language``, ``speaker``, ``duration``, ``source``, ...), one shard folder per split,
``<out>/<split>/<split>-NNNNNN.tar`` plus ``index.json``. What was kept and skipped, and why, is
reported by ``datamodules/report.py`` (``prepare_summary.json``, ``prepare_skipped.tsv``).

Durations (``--max-seconds``, ``--min-seconds``, ``--min-piece-seconds``) obey
``min_seconds <= min_piece_seconds <= max_seconds / 2``, with ``max_seconds`` in [1, 120] s (see
``datamodules/processing.py`` for what each does).

Exit status: 0 when every input was kept, 3 when any input was skipped (the shards are still
complete and valid for the rest), 2 for usage errors, before any input is read: a numeric option
that is not a finite number in its range (see ``--help``; the same checks raise
:class:`~datamodules.manifests.PrepareError` from :func:`prepare`), durations that break the rule
above, an unreadable manifest, missing columns.

Examples::

    speechless-prepare --manifest ../shared/data/fsdd/manifest.tsv --out data/fsdd/shards
    speechless-prepare --hf-dataset data/twi_hf --hf-split train --language tw --out data/twi/shards
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from datamodules.audio import TARGET_RATE
from datamodules.manifests import Item, PrepareError, read_hf_dataset, read_manifest, unique_key, with_audio
from datamodules.processing import Outcome, ProcessOptions, process_all
from datamodules.report import (
    EXIT_USAGE,
    SUMMARY_NAME,
    PrepareSummary,
    print_summary,
    progress_bar,
    skipped_row,
    write_report,
)
from datamodules.shards import INDEX_NAME, ShardWriter

__all__ = [
    "build_parser",
    "check_durations",
    "main",
    "min_piece_default",
    "parse_size",
    "prepare",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
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
        The :class:`~datamodules.report.PrepareSummary`, also written to ``<out>/prepare_summary.json``.

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
    opts = ProcessOptions(
        require_text=require_text,
        max_seconds=max_seconds,
        min_piece_seconds=check_durations(max_seconds, min_seconds, min_piece_seconds),
        min_seconds=min_seconds,
        trim_silence=trim_silence,
    )
    columns = {
        "audio": audio_column,
        "text": text_column,
        "speaker": speaker_column,
        "language": language_column,
        "id": id_column,
        "split": split_column,
    }
    defaults = {"split": split, "language": language or "und", "speaker": speaker or "unknown"}
    if manifest is not None:
        items = read_manifest(manifest, columns=columns, defaults=defaults, require_text=require_text)
        jobs: list[Item] | Iterator[Item] = items
    else:
        items, audio = read_hf_dataset(
            hf_dataset, splits=hf_split, config=hf_config, columns=columns, defaults=defaults,
            require_text=require_text,
        )  # fmt: skip
        jobs = with_audio(items, audio)
    out = Path(out)
    summary = PrepareSummary(out=str(out), inputs=len(items))
    used = _dedupe_keys(items, summary)
    writers = _open_writers(out, items, summary, max_samples=max_samples, max_bytes=max_bytes)
    workers = min(workers or os.cpu_count() or 1, max(1, len(items)))
    skipped_rows: list[str] = []
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("preparing", total=len(items))
            for item, result in zip(items, process_all(jobs, opts, workers)):
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
    write_report(out, summary, skipped_rows)
    return summary


def _dedupe_keys(items: list[Item], summary: PrepareSummary) -> set[str]:
    """Make the items' keys unique in input order (``duplicate_key`` warnings); returns the keys."""
    used: set[str] = set()
    for item in items:
        base, item.key = item.key, unique_key(item.key, used)
        if item.key != base:
            summary.warn("duplicate_key", item.source, item.key)
    return used


def _open_writers(
    out: Path, items: list[Item], summary: PrepareSummary, *, max_samples: int, max_bytes: int
) -> dict[str, ShardWriter]:
    """One shard writer per split that has a usable input, and the split's empty counts."""
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
    return writers


def _record(
    item: Item,
    result: Outcome,
    writers: dict[str, ShardWriter],
    summary: PrepareSummary,
    used: set[str],
    skipped_rows: list[str],
) -> None:
    """Count one input's outcome, and write its samples when it was kept."""
    for kind, detail in result.warnings:
        summary.warn(kind, item.source, detail)
    if result.reason is not None:
        summary.skip(result.reason, item.source, result.detail)
        skipped_rows.append(skipped_row(item.source, result.reason, result.detail))
        if item.split in summary.splits:
            summary.splits[item.split]["inputs"] += 1
        return
    stats = summary.splits[item.split]
    stats["inputs"] += 1
    stats["kept"] += 1
    summary.kept += 1
    for key, flac, meta in result.samples:
        # Piece keys are made in the worker; one may meet a key another input already holds.
        key = key if key == item.key else unique_key(key, used)
        writers[item.split].write({"__key__": key, "flac": flac, "json": meta})
        stats["samples"] += 1
        stats["seconds"] += meta["duration"]
        summary.samples += 1
        summary.seconds += meta["duration"]


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
