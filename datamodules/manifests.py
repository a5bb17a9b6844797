"""Reading preparation's sources: a manifest (TSV or JSONL) or a Hugging Face ``datasets`` dataset.

Each input recording becomes an :class:`Item` (its metadata; the audio as a path, or bytes streamed
in input order for a dataset), keyed by a WebDataset-safe key (:func:`sanitize_key`, made unique by
:func:`unique_key`). A malformed row is not lost: it becomes an item with ``error`` set, so
``speechless-prepare`` (``datamodules/prepare.py``) counts it as ``bad_manifest_row``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "Item",
    "PrepareError",
    "read_hf_dataset",
    "read_manifest",
    "sanitize_key",
    "unique_key",
    "with_audio",
]

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_FIELDS = ("audio", "text", "speaker", "language", "id", "split")


class PrepareError(Exception):
    """A usage problem that stops the run before any input is processed (exit status 2).

    Raised by the readers here (an unreadable manifest, a missing column) and by
    :func:`datamodules.prepare.prepare`'s option checks.
    """


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


def unique_key(key: str, used: set[str]) -> str:
    """``key``, or ``key_1``, ``key_2``, ... when ``used`` holds it already; the result joins ``used``."""
    candidate, n = key, 0
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def with_audio(items: list[Item], stream: Iterator[Any]) -> Iterator[Item]:
    """Jobs for lazily read sources: copies of the items with their audio attached, in order.

    Copies, so the main process's items keep metadata only while the audio travels to a worker.
    """
    for item, audio in zip(items, stream, strict=True):
        yield item if item.error is not None else replace(item, audio=audio)
