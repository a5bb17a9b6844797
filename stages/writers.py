"""Prediction writers: token shards + JSONL (stage-1 tokenization, stage-2 synthesis) and cached
encoder states, written so that a killed ``lightning predict`` resumes where it stopped.

Each rank writes its own shards. A shard is finished when its manifest exists::

    <prefix>-r<rank>-<seq>.tar            the samples (written as a hidden .tmp file, renamed when complete)
    <prefix>-r<rank>-<seq>.jsonl          its JSONL records, sorted by id (``kind="tokens"`` only)
    <prefix>-r<rank>-<seq>.manifest.json  written last, atomically: the shard's index entry, the ids
                                          (sample keys) it holds and the run's fingerprint
    index.json, <jsonl_name>              merged by rank 0 when every rank is done

**Resume.** Before the predict loader is built (the ``setup`` hook), rank 0 removes what a killed run
left half-written (temporary files; a ``.tar`` or ``.jsonl`` without its manifest) and reads the ids
of the finished shards; every rank receives them by broadcast. A datamodule with an
``exclude_keys(keys) -> remaining`` method (:class:`datamodules.text.TextInstructionDataModule`)
drops them before splitting the rest over the ranks, so nothing is predicted twice and every rank
still runs the same number of batches; when nothing remains, rank 0 merges at once and the loop
runs no batch. Other datamodules (stage 1's ``SpeechDataModule``) predict everything again and the
writer leaves out the keys already written. Either way the merged ``index.json`` and JSONL hold each
key exactly once, over any number of ranks and restarts. Padding samples of the exact-epoch plan
(``sample_weight == 0``) are never written; a key seen twice is an error, never a silent duplicate.
Assumes ``output_dir`` is on a file system every rank sees (as the merge always has).

**A rerun with another configuration.** The fingerprint is the LightningModule's class, a sha256
of its weights (``state_dict``), its ``prediction_settings()`` where it has one (stage 2: the
decoding options) and this writer's ``kind`` and ``compress``. When the finished shards carry
another fingerprint (another model, other decoding settings), ``on_change="restart"`` (default)
deletes them and starts over, as every rerun did before resuming existed, and prints so;
``on_change="refuse"`` stops with an error instead. Outputs of two configurations are never mixed.

**Reproducibility.** Greedy decoding (the configs' default) gives each id the same codes whatever
the rank count or restart, since batched generation equals per-sample generation (tested on the
CPU; bf16 GPU kernels may differ in rare near-ties). Sampled synthesis (``greedy: false``) draws
from the seeded global generator batch by batch, so a resumed run samples other (equally valid)
codes for the ids it writes than an uninterrupted run would.

The JSONL follows the Twi stage-1 release's ``*_semantic_tokens*.jsonl``: one object per utterance
with ``id``, ``text``, ``tokens`` (level-0 Ichigo string), ``tokens_all_levels`` (the multi-level
string of :mod:`models.codec`) and ``codes`` (a list per level), plus ``speaker``, ``language`` and
``duration``.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.shards import (
    ShardIndex,
    ShardInfo,
    atomic_write_text,
    encode_member,
    file_sha256,
    write_index,
)
from models.codec import codes_to_string, levels_to_string

__all__ = ["ShardPredictionWriter", "jsonl_records", "prediction_fingerprint", "weights_digest"]

MANIFEST = ".manifest.json"
FAN_IN = 256  # sorted JSONL parts merged at once (open files)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's ``state_dict`` (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def prediction_fingerprint(pl_module: LightningModule, **writer: Any) -> dict[str, Any]:
    """What decides a prediction's output: module class, weights, ``prediction_settings()``, writer options."""
    settings = getattr(pl_module, "prediction_settings", None)
    fingerprint = {
        "module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "weights": weights_digest(pl_module),
        "settings": settings() if callable(settings) else {},
        "writer": writer,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


class _OpenShard:
    """One shard being written: a hidden temporary tar, its ids, JSONL lines and durations."""

    def __init__(self, out_dir: Path, stem: str) -> None:
        self.out_dir, self.stem = out_dir, stem
        self.tmp = out_dir / f".{stem}.tar.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.ids: list[str] = []
        self.lines: list[str] = []
        self.durations: list[float] = []

    def add(self, key: str, members: dict[str, Any], seconds: float, line: str | None) -> None:
        for ext, value in members.items():
            data = encode_member(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: reruns are byte-identical
            self.tar.addfile(info, io.BytesIO(data))
        self.ids.append(key)
        self.durations.append(round(float(seconds), 3))
        if line is not None:
            self.lines.append(line)

    @property
    def bytes(self) -> int:
        return self.tar.fileobj.tell()

    def commit(self, seq: int, fingerprint: dict[str, Any]) -> None:
        """Rename the tar into place, write the sorted JSONL part, then the manifest (the commit mark)."""
        self.tar.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out_dir / f"{self.stem}.tar"
        os.replace(self.tmp, final)
        jsonl = None
        if self.lines:
            jsonl = f"{self.stem}.jsonl"
            atomic_write_text(self.out_dir / jsonl, "".join(line for _, line in sorted(zip(self.ids, self.lines))))
        info = ShardInfo(url=final.name, samples=len(self.ids), seconds=round(sum(self.durations), 3),
                         bytes=os.path.getsize(final), sha256=file_sha256(final), durations=self.durations)
        manifest = {"version": 1, "seq": seq, "shard": vars(info), "ids": sorted(self.ids), "jsonl": jsonl,
                    "fingerprint": fingerprint}
        atomic_write_text(self.out_dir / f"{self.stem}{MANIFEST}", json.dumps(manifest) + "\n")


def _merge_into(parts: list[tuple[list[str], Path]], dest: Path) -> None:
    with ExitStack() as stack, open(dest, "w") as out:
        streams = [zip(ids, stack.enter_context(open(path)), strict=True) for ids, path in parts]
        for _, line in heapq.merge(*streams, key=lambda pair: pair[0]):
            out.write(line)


def _merge_sorted(parts: list[tuple[list[str], Path]], dest: Path) -> None:
    """Merge JSONL files sorted by id (``(ids, path)`` pairs, ids in line order) into ``dest``, streamed.

    At most :data:`FAN_IN` files are open at once: more parts are merged group by group into
    temporary parts first.
    """
    temps: set[Path] = set()
    level = 0
    while len(parts) > FAN_IN:
        merged = []
        for n in range(0, len(parts), FAN_IN):
            group, tmp = parts[n : n + FAN_IN], dest.with_name(f".{dest.name}.part-{level}-{n}.tmp")
            _merge_into(group, tmp)
            for _, path in group:
                if path in temps:
                    path.unlink()
            temps.add(tmp)
            merged.append((sorted(i for ids, _ in group for i in ids), tmp))
        parts, level = merged, level + 1
    tmp = dest.with_name(f".{dest.name}.tmp")
    _merge_into(parts, tmp)
    for _, path in parts:
        if path in temps:
            path.unlink()
    os.replace(tmp, dest)


class ShardPredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs as shards (the token-sample contract) and a JSONL export, resumably.

    Predictions are on disk, not also returned: the writer turns the predict loop's
    ``return_predictions`` off, which would otherwise hold every output in memory.

    Args:
        output_dir: folder for shards, manifests, ``index.json`` and the JSONL.
        kind: ``tokens`` (codes ``[Q, T]`` as ``codes.npy``) or ``states`` (encoder states
            ``[T, D]`` as float16 ``states.npy``, the cache stage 1 can train from).
        prefix: shard name prefix.
        max_samples: samples per shard (also the unit of work a kill can lose, per rank).
        max_bytes: a shard is closed once it reaches this many bytes.
        jsonl_name: name of the merged JSONL (tokens only; empty string disables it).
        compress: run-length compress the level-0 token string with duration tokens.
        on_change: what a rerun does when the finished shards in ``output_dir`` carry another
            fingerprint (module docstring): ``restart`` (delete them, start over) or ``refuse``.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        kind: Literal["tokens", "states"] = "tokens",
        prefix: str | None = None,
        max_samples: int = 2000,
        max_bytes: int = 256 * 1024 * 1024,
        jsonl_name: str = "semantic_tokens.jsonl",
        compress: bool = False,
        on_change: Literal["restart", "refuse"] = "restart",
    ) -> None:
        super().__init__(write_interval="batch")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        if on_change not in ("restart", "refuse"):
            raise ValueError(f"on_change must be 'restart' or 'refuse', got {on_change!r}")
        self.output_dir, self.kind = Path(output_dir), kind
        self.prefix = prefix or kind
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.jsonl_name, self.compress, self.on_change = jsonl_name, compress, on_change
        self._shard: _OpenShard | None = None
        self._done: frozenset[str] = frozenset()
        self._seen: set[str] = set()
        self._fingerprint: dict[str, Any] = {}
        self._seq = 0
        self.written = 0  # samples this run wrote on this rank
        self.already = 0  # samples predicted again but left out, written by an earlier run (this rank)

    # ---- resume: before the predict loader is built -------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        trainer.predict_loop.return_predictions = False
        state: dict[str, Any] = {}
        if trainer.is_global_zero:
            try:
                state = self._scan(prediction_fingerprint(pl_module, kind=self.kind, compress=self.compress))
            except Exception as exc:  # every rank must learn of it, or the others wait in the broadcast
                state = {"error": str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"}
        state = trainer.strategy.broadcast(state, src=0)
        if "error" in state:
            raise ValueError(state["error"])
        self._done, self._fingerprint = frozenset(state["ids"]), state["fingerprint"]
        self._seq, self._seen, self._shard, self.written, self.already = state["next_seq"], set(), None, 0, 0
        exclude = getattr(trainer.datamodule, "exclude_keys", None)
        if not callable(exclude):
            if self._done and trainer.is_global_zero:
                print(f"[{self.kind}] resuming in {self.output_dir}: {len(self._done)} samples already written; "
                      "this datamodule predicts them again and they are left out", flush=True)
            return
        left = exclude(self._done)  # the same on every rank: the same ids, the same input
        if trainer.is_global_zero and self._done:
            print(f"[{self.kind}] resuming in {self.output_dir}: {len(self._done)} written, {left} left", flush=True)
        if left == 0:  # the loop runs no batch, so on_predict_end will not merge: merge here
            if trainer.is_global_zero:
                self._merge()
            trainer.strategy.barrier("shard-writer-merged")

    def _scan(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: clean what a killed run left half-written; the finished shards' ids and next ``seq``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        manifests = self._manifests()
        if any(m["fingerprint"] != fingerprint for m in manifests):
            other = next(m["fingerprint"] for m in manifests if m["fingerprint"] != fingerprint)
            what = [k for k in sorted(set(other) | set(fingerprint)) if other.get(k) != fingerprint.get(k)]
            message = (f"{self.output_dir} holds {len(manifests)} shards written with another {'/'.join(what)} "
                       f"(fingerprint differs)")
            if self.on_change == "refuse":
                raise ValueError(f"{message}; use another output_dir, delete it, or set on_change: restart")
            print(f"[{self.kind}] {message}: deleting them and starting over", flush=True)
            for m in manifests:
                (self.output_dir / f"{self._stem(m)}{MANIFEST}").unlink()
            for name in (self.jsonl_name, "index.json"):
                if name:
                    (self.output_dir / name).unlink(missing_ok=True)
            manifests = []
        finished = {self._stem(m) for m in manifests}
        for path in self.output_dir.glob(f"{self.prefix}-r*"):
            stem = path.name.removesuffix(MANIFEST).removesuffix(".tar").removesuffix(".jsonl")
            if stem not in finished:
                path.unlink()  # half-written: a tar or JSONL part without its manifest
        merge_tmp = [f".{name}.*tmp*" for name in ("index.json", self.jsonl_name) if name]
        for pattern in [f".{self.prefix}-r*", *merge_tmp]:
            for path in self.output_dir.glob(pattern):
                path.unlink()  # temporary files of a killed run (or of a merge it was killed in)
        ids = [i for m in manifests for i in m["ids"]]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.output_dir}: the manifests list an id twice; the folder was edited by hand")
        return {"ids": ids, "next_seq": max((m["seq"] for m in manifests), default=-1) + 1, "fingerprint": fingerprint}

    def _manifests(self) -> list[dict[str, Any]]:
        """The finished shards' manifests in name order; one whose tar is missing or cut short, or whose
        JSONL part is missing, is dropped (its shard is predicted again)."""
        manifests = []
        for path in sorted(self.output_dir.glob(f"{self.prefix}-r*{MANIFEST}")):
            m = json.loads(path.read_text())
            tar = self.output_dir / m["shard"]["url"]
            jsonl_lost = m["jsonl"] is not None and not (self.output_dir / m["jsonl"]).exists()
            if not tar.exists() or tar.stat().st_size != m["shard"]["bytes"] or jsonl_lost:
                path.unlink()
                continue
            manifests.append(m)
        return manifests

    @staticmethod
    def _stem(manifest: dict[str, Any]) -> str:
        return manifest["shard"]["url"].removesuffix(".tar")

    # ---- writing ------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for i, key in enumerate(prediction["keys"]):
            if prediction["weights"][i] <= 0:
                continue
            if key in self._done:
                self.already += 1
                continue
            if key in self._seen:
                raise RuntimeError(f"key {key!r} predicted twice; the prediction loader duplicated samples")
            self._seen.add(key)
            meta, line = dict(prediction["meta"][i]), None
            if self.kind == "tokens":
                codes: torch.Tensor = prediction["codes"][i]  # [Q, T]
                meta["n_frames"], meta["num_quantizers"] = int(codes.shape[1]), int(codes.shape[0])
                dtype = np.int16 if codes.numel() == 0 or int(codes.max()) < 32767 else np.int32
                members = {"json": meta, "codes.npy": codes.numpy().astype(dtype)}
                if self.jsonl_name:
                    record = {
                        "id": key,
                        "text": meta.get("text", ""),
                        "tokens": codes_to_string(codes[0].tolist(), compress=self.compress),
                        "tokens_all_levels": levels_to_string(codes.tolist()),
                        "codes": codes.tolist(),
                        **{k: meta[k] for k in ("speaker", "language", "duration") if k in meta},
                    }
                    line = json.dumps(record, ensure_ascii=False) + "\n"
            else:
                states: torch.Tensor = prediction["states"][i]  # [T, D]
                meta["n_frames"] = int(states.shape[0])
                members = {"json": meta, "states.npy": states.to(torch.float16).numpy()}
            if self._shard is None:
                self._shard = _OpenShard(self.output_dir, f"{self.prefix}-r{trainer.global_rank:03d}-{self._seq:06d}")
            self._shard.add(key, members, meta.get("duration", 0.0), line)
            self.written += 1
            if len(self._shard.ids) >= self.max_samples or self._shard.bytes >= self.max_bytes:
                self._commit()

    def _commit(self) -> None:
        self._shard.commit(self._seq, self._fingerprint)
        self._shard, self._seq = None, self._seq + 1

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._shard is not None:
            self._commit()
        trainer.strategy.barrier("shard-writer")
        if trainer.is_global_zero:
            self._merge()
        trainer.strategy.barrier("shard-writer-merged")

    def _merge(self) -> None:
        """Rank 0: ``index.json`` and the JSONL (sorted by id) over every finished shard, of every run."""
        manifests = self._manifests()
        ids = [i for m in manifests for i in m["ids"]]
        if len(ids) != len(set(ids)):
            raise RuntimeError(f"{self.output_dir}: an id was written twice")
        shards = [ShardInfo(**m["shard"]) for m in manifests]
        index = ShardIndex(shards=shards, kind=self.kind, root=str(self.output_dir))
        write_index(index, self.output_dir / "index.json")
        if self.kind == "tokens" and self.jsonl_name:
            parts = [(m["ids"], self.output_dir / m["jsonl"]) for m in manifests if m["jsonl"]]
            _merge_sorted(parts, self.output_dir / self.jsonl_name)
        print(f"[{self.kind}] wrote {index.samples} samples in {len(index.shards)} shards to {self.output_dir}", flush=True)


def jsonl_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL export back (tests and stage 2 use it)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
