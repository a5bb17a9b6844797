"""WebDataset shard writing and the shard index: the on-disk contract every stage shares.

A shard directory holds ``<prefix>-NNNNNN.tar`` files and one ``index.json``::

    {"version": 1, "kind": "speech" | "tokens" | "states" | "synthetic",
     "samples": 1234, "seconds": 5678.9,
     "shards": [{"url": "train-000000.tar", "samples": 500, "seconds": 2301.2,
                 "bytes": 41943040, "sha256": "..."}, ...]}

``url`` is relative to the index's folder. The index lets every rank know the epoch length
(samples and seconds per shard) without reading the data (see ``../shared/DESIGN.md``).

Samples are WebDataset records: ``__key__`` (unique, no dots) plus members such as ``flac``
(16 kHz mono audio), ``json`` (metadata with at least ``text``, ``language``, ``speaker``,
``duration``, ``source``) or ``codes.npy`` (an integer array ``[Q, T]``).

Shards are written under a temporary name and renamed when complete, so an interrupted run never
leaves a half-written ``.tar`` that later reads as valid; the index is written the same way.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "INDEX_NAME",
    "ShardInfo",
    "ShardIndex",
    "ShardWriter",
    "atomic_write_text",
    "encode_member",
    "file_sha256",
    "iter_tar_samples",
    "read_index",
    "resolve_shards",
    "scan_shard",
    "write_index",
]

INDEX_NAME = "index.json"


@dataclass
class ShardInfo:
    """One shard's entry in the index."""

    url: str
    samples: int
    seconds: float
    bytes: int = 0
    sha256: str = ""
    # Per-sample seconds in stream order: lets every rank plan equal batch counts from the index alone.
    durations: list[float] | None = None


@dataclass
class ShardIndex:
    """The index of a shard directory; ``root`` is the folder urls are relative to."""

    shards: list[ShardInfo]
    kind: str = "speech"
    root: str = "."
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def seconds(self) -> float:
        return float(sum(s.seconds for s in self.shards))

    def paths(self) -> list[str]:
        """Absolute shard paths, in index order."""
        return [s.url if os.path.isabs(s.url) else os.path.join(self.root, s.url) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "kind": self.kind,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "shards": [asdict(s) for s in self.shards],
            **({"extra": self.extra} if self.extra else {}),
        }


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index(index: ShardIndex, path: str | os.PathLike) -> None:
    """Write ``index`` as JSON at ``path`` (a folder means ``<folder>/index.json``), atomically."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / INDEX_NAME
    atomic_write_text(path, json.dumps(index.to_json(), indent=1) + "\n")


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Read an index file (or ``<folder>/index.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    with open(path) as f:
        data = json.load(f)
    if data.get("version") != 1:
        raise ValueError(f"{path}: unsupported shard index version {data.get('version')!r}")
    shards = [ShardInfo(**s) for s in data["shards"]]
    return ShardIndex(shards=shards, kind=data.get("kind", "speech"), root=str(path.parent), extra=data.get("extra", {}))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (shard indexes, artifact weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_member(value: Any) -> bytes:
    """Serialise one sample member the way WebDataset's default decoders read it back."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot serialise a {type(value).__name__} into a shard")


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Yield raw samples ``{"__key__": str, ext: bytes}`` from one tar, grouped by key."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            if "." not in name:
                continue
            key, ext = name.split(".", 1)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            data = tar.extractfile(member)
            current[ext] = data.read() if data is not None else b""
    if current is not None:
        yield current


def _sample_seconds(sample: dict[str, bytes]) -> float:
    meta = sample.get("json")
    if not meta:
        return 0.0
    try:
        return float(json.loads(meta).get("duration", 0.0))
    except (ValueError, AttributeError):
        return 0.0


def scan_shard(path: str | os.PathLike, *, with_hash: bool = True) -> ShardInfo:
    """Build a shard's index entry by reading it (for shards that came without an index)."""
    durations = [round(_sample_seconds(sample), 3) for sample in iter_tar_samples(path)]
    return ShardInfo(
        url=os.path.basename(path),
        samples=len(durations),
        seconds=round(sum(durations), 3),
        durations=durations,
        bytes=os.path.getsize(path),
        sha256=file_sha256(path) if with_hash else "",
    )


def resolve_shards(spec: str | os.PathLike | Iterable[str]) -> ShardIndex:
    """Turn a shard specification into an index.

    Args:
        spec: an index file or a folder holding ``index.json``; a glob (``data/train-*.tar``); a brace
            pattern (``data/train-{000000..000009}.tar``); or a list of tar paths. Shards named by
            glob or brace use the ``index.json`` beside them when it lists them, and are scanned
            otherwise.

    Returns:
        A :class:`ShardIndex` whose ``paths()`` are absolute.
    """
    if not isinstance(spec, (str, os.PathLike)):
        paths = [str(p) for p in spec]
    else:
        spec = str(spec)
        if spec.endswith(".json") or os.path.isdir(spec):
            return read_index(spec)
        if "{" in spec:
            import braceexpand

            paths = list(braceexpand.braceexpand(spec))
        else:
            paths = sorted(_glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"no shards match {spec!r}")
    known: dict[str, ShardInfo] = {}
    for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        if os.path.exists(os.path.join(folder, INDEX_NAME)):
            idx = read_index(folder)
            for info, full in zip(idx.shards, idx.paths()):
                known[os.path.abspath(full)] = info
    infos = []
    for p in paths:
        full = os.path.abspath(p)
        if not os.path.exists(full):
            raise FileNotFoundError(f"shard {p!r} does not exist")
        info = known.get(full) or scan_shard(full, with_hash=False)
        infos.append(
            ShardInfo(
                url=full,
                samples=info.samples,
                seconds=info.seconds,
                bytes=info.bytes,
                sha256=info.sha256,
                durations=info.durations,
            )
        )
    return ShardIndex(shards=infos, root="/")


class ShardWriter:
    """Write samples into size-capped tar shards and an index, atomically.

    Each shard is written as ``.<name>.tmp`` and renamed to ``<name>`` when closed. ``close()``
    writes ``index.json`` and removes shards of an earlier run with the same prefix that this run
    did not write, so re-running with the same inputs gives the same folder.

    Args:
        out_dir: folder for the shards and the index.
        prefix: shard file prefix (``train`` gives ``train-000000.tar``).
        max_samples: at most this many samples per shard.
        max_bytes: a shard is closed once it reaches this many bytes.
        kind: the index's ``kind``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        kind: str = "speech",
        index_name: str = INDEX_NAME,
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.kind, self.index_name = kind, index_name
        self.infos: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._count = 0
        self._seconds = 0.0
        self._durations: list[float] = []
        self._keys: set[str] = set()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.infos):06d}.tar"
        self._final = self.out_dir / name
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._count, self._seconds, self._durations = 0, 0.0, []

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._final)
        self.infos.append(
            ShardInfo(
                url=self._final.name,
                samples=self._count,
                seconds=round(self._seconds, 3),
                bytes=os.path.getsize(self._final),
                sha256=file_sha256(self._final),
                durations=self._durations,
            )
        )
        self._tar = None

    def write(self, sample: dict[str, Any], *, seconds: float | None = None) -> None:
        """Add one sample: ``__key__`` plus members (bytes, str, dict/list as JSON, numpy arrays)."""
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = encode_member(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            # A fixed mtime keeps re-runs byte-identical (same sha256 in the index).
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        if seconds is None:
            meta = sample.get("json")
            seconds = float(meta.get("duration", 0.0)) if isinstance(meta, dict) else 0.0
        self._count += 1
        self._seconds += seconds
        self._durations.append(round(float(seconds), 3))
        if self._count >= self.max_samples or self._tar.fileobj.tell() >= self.max_bytes:
            self._close_shard()

    def close(self, extra: dict[str, Any] | None = None) -> ShardIndex:
        """Finish the last shard, drop stale shards of this prefix, write the index and return it."""
        self._close_shard()
        written = {i.url for i in self.infos}
        for stale in self.out_dir.glob(f"{self.prefix}-*.tar"):
            if stale.name not in written:
                stale.unlink()
        for tmp in self.out_dir.glob(f".{self.prefix}-*.tar.tmp"):
            tmp.unlink()
        index = ShardIndex(shards=list(self.infos), kind=self.kind, root=str(self.out_dir), extra=extra or {})
        write_index(index, self.out_dir / self.index_name)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            # Leave no half-written shard behind: the temporary file is removed, not renamed.
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
