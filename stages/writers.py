"""Prediction writers: token shards + JSONL (stage-1 tokenization) and cached encoder states.

Each rank writes its own shards (``<prefix>-r<rank>-NNNNNN.tar``) and a part index; after a barrier
rank 0 merges the parts into one ``index.json`` and one JSONL sorted by id. Padding samples of the
exact-epoch plan (``sample_weight == 0``) are not written, so every input is written exactly once
across ranks. A key seen twice is an error, never a silent duplicate.

The JSONL follows the Twi stage-1 release's ``*_semantic_tokens*.jsonl``: one object per utterance
with ``id``, ``text``, ``tokens`` (level-0 Ichigo string), ``tokens_all_levels`` (the multi-level
string of :mod:`models.codec`) and ``codes`` (a list per level), plus ``speaker``, ``language`` and
``duration``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.shards import ShardIndex, ShardWriter, read_index, write_index
from models.codec import codes_to_string, levels_to_string

__all__ = ["ShardPredictionWriter"]


class ShardPredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs as shards (the token-sample contract) and a JSONL export.

    Args:
        output_dir: folder for shards, ``index.json`` and the JSONL.
        kind: ``tokens`` (codes ``[Q, T]`` as ``codes.npy``) or ``states`` (encoder states
            ``[T, D]`` as float16 ``states.npy``, the cache stage 1 can train from).
        prefix: shard name prefix.
        max_samples: samples per shard.
        jsonl_name: name of the merged JSONL (tokens only; empty string disables it).
        compress: run-length compress the level-0 token string with duration tokens.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        kind: Literal["tokens", "states"] = "tokens",
        prefix: str | None = None,
        max_samples: int = 2000,
        jsonl_name: str = "semantic_tokens.jsonl",
        compress: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.kind = Path(output_dir), kind
        self.prefix = prefix or kind
        self.max_samples, self.jsonl_name, self.compress = max_samples, jsonl_name, compress
        self._writer: ShardWriter | None = None
        self._jsonl = None
        self.written = 0

    def _part(self, rank: int) -> str:
        return f"{self.prefix}-r{rank:03d}"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        part = self._part(trainer.global_rank)
        self._writer = ShardWriter(
            self.output_dir, prefix=part, max_samples=self.max_samples, kind=self.kind, index_name=f".{part}.index.json"
        )
        if self.kind == "tokens" and self.jsonl_name:
            self._jsonl = open(self.output_dir / f".{part}.jsonl", "w")
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        for i, key in enumerate(prediction["keys"]):
            if prediction["weights"][i] <= 0:
                continue
            meta = dict(prediction["meta"][i])
            if self.kind == "tokens":
                codes: torch.Tensor = prediction["codes"][i]  # [Q, T]
                meta["n_frames"] = int(codes.shape[1])
                meta["num_quantizers"] = int(codes.shape[0])
                array = codes.numpy().astype(np.int16 if codes.numel() == 0 or int(codes.max()) < 32767 else np.int32)
                self._writer.write({"__key__": key, "json": meta, "codes.npy": array}, seconds=meta.get("duration", 0.0))
                if self._jsonl is not None:
                    record = {
                        "id": key,
                        "text": meta.get("text", ""),
                        "tokens": codes_to_string(codes[0].tolist(), compress=self.compress),
                        "tokens_all_levels": levels_to_string(codes.tolist()),
                        "codes": codes.tolist(),
                        **{k: meta[k] for k in ("speaker", "language", "duration") if k in meta},
                    }
                    self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                states: torch.Tensor = prediction["states"][i]  # [T, D]
                meta["n_frames"] = int(states.shape[0])
                self._writer.write(
                    {"__key__": key, "json": meta, "states.npy": states.to(torch.float16).numpy()},
                    seconds=meta.get("duration", 0.0),
                )
            self.written += 1

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._writer.close(extra={"rank": trainer.global_rank})
        if self._jsonl is not None:
            self._jsonl.close()
        trainer.strategy.barrier("shard-writer")
        if trainer.is_global_zero:
            self._merge(trainer.world_size)
        trainer.strategy.barrier("shard-writer-merged")

    def _merge(self, world_size: int) -> None:
        shards, kept = [], set()
        for rank in range(world_size):
            part_index = self.output_dir / f".{self._part(rank)}.index.json"
            part = read_index(part_index)
            shards.extend(part.shards)
            kept.update(s.url for s in part.shards)
            part_index.unlink()
        # Shards of an earlier run with more ranks are stale: remove them.
        for stale in self.output_dir.glob(f"{self.prefix}-r*-*.tar"):
            if stale.name not in kept:
                stale.unlink()
        index = ShardIndex(shards=shards, kind=self.kind, root=str(self.output_dir))
        write_index(index, self.output_dir / "index.json")
        if self.kind == "tokens" and self.jsonl_name:
            records = []
            for rank in range(world_size):
                part = self.output_dir / f".{self._part(rank)}.jsonl"
                with open(part) as f:
                    records.extend(f.readlines())
                part.unlink()
            records.sort(key=lambda line: json.loads(line)["id"])
            ids = [json.loads(line)["id"] for line in records]
            if len(ids) != len(set(ids)):
                raise RuntimeError("tokenization wrote an id twice; the prediction loader duplicated samples")
            tmp = self.output_dir / f".{self.jsonl_name}.tmp"
            with open(tmp, "w") as f:
                f.writelines(records)
            os.replace(tmp, self.output_dir / self.jsonl_name)
        print(f"[{self.kind}] wrote {index.samples} samples in {len(index.shards)} shards to {self.output_dir}", flush=True)


def jsonl_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL export back (tests and stage 2 use it)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
