"""Text instructions for stage-2 synthesis (``lightning predict`` writes synthetic speech tokens).

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417): the stage-2 LM turns the text
instructions of an instruction data set into semantic tokens, which stage 3 trains on instead of
recorded speech. Input is a JSONL file (one object per line) or a Hugging Face dataset saved on
disk (``datasets.save_to_disk``); field names are configurable.

Each instruction's id (its sample key in the synthetic shards) is the record's own ``id`` field when
present, else ``id-<16 hex>``: the first 64 bits of the sha256 of the row as canonical JSON (sorted
keys), so an id-less set keeps its ids when lines are reordered or added. Duplicate ids (two
identical id-less rows, too) are an error.

The predict loader splits the instructions across ranks by stride (`datamodules.ranks.rank_slice`), so every instruction
is predicted exactly once; the shorter ranks are padded with ``sample_weight == 0`` copies so all
ranks run the same number of batches (the writers skip weight-0 samples). A resumed synthesis
(:class:`stages.writers.ShardPredictionWriter` over a folder holding finished shards) calls
:meth:`TextInstructionDataModule.exclude_keys` first: the ids already written are dropped before the
split, and every rank, given the same ids, splits the same remainder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.ranks import rank_slice, trainer_rank

__all__ = ["TextInstructionDataModule", "load_instructions", "row_id"]


def row_id(row: dict[str, Any]) -> str:
    """The stable id of a row without one: ``id-`` + 16 hex digits of the sha256 of its canonical JSON."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return "id-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_instructions(
    path: str | Path, *, instruction_field: str = "instruction", response_field: str = "response",
    id_field: str = "id", split: str | None = None,
) -> list[dict[str, Any]]:
    """Read instruction records as ``{"id", "instruction", "response", ...}`` dicts.

    Args:
        path: a ``.jsonl`` file, or a folder written by ``datasets`` ``save_to_disk``.
        instruction_field, response_field, id_field: source field names (a row without
            ``id_field`` gets :func:`row_id`, a hash of its content).
        split: the split of a saved ``DatasetDict``.

    Raises:
        ValueError: a record without an instruction, a duplicate id (two identical id-less rows
            included), an id with ``.`` or ``/`` (shard keys cannot hold them), or an unreadable line.
    """
    path = Path(path)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                raise ValueError(f"{path} holds splits {list(ds)}: set split")
            ds = ds[split]
        rows = list(ds)
    else:
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
    records, seen = [], set()
    for n, row in enumerate(rows):
        text = row.get(instruction_field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: record {n} has no {instruction_field!r} text")
        key = str(row[id_field]) if row.get(id_field) is not None else row_id(row)
        if key in seen:
            why = "" if row.get(id_field) is not None else f" (rows without {id_field!r} are identical)"
            raise ValueError(f"{path}: record {n}: duplicate id {key!r}{why}; ids must be unique")
        if not key or "." in key or "/" in key:
            raise ValueError(f"{path}: record {n}: id {key!r} cannot be a shard key (empty, or holds '.' or '/')")
        seen.add(key)
        extra = {k: v for k, v in row.items() if k not in (instruction_field, response_field, id_field)}
        records.append({**extra, "id": key, "instruction": text, "response": row.get(response_field, "")})
    return records


class _Items(IterableDataset):
    """This rank's items in order. Iterable, so that Lightning never wraps it in a DistributedSampler
    (``use_distributed_sampler`` is on by default): the datamodule has split the records over the
    ranks already, and a second split would silently drop half of them."""

    def __init__(self, items: list[tuple[dict[str, Any], float]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def _collate(items: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    return {
        "keys": [r["id"] for r, _ in items],
        "texts": [r["instruction"] for r, _ in items],
        "meta": [dict(r) for r, _ in items],
        "sample_weight": torch.tensor([w for _, w in items], dtype=torch.float32),
    }


class TextInstructionDataModule(L.LightningDataModule):
    """Predict batches of instruction texts: ``{"keys": [B], "texts": [B], "meta": [B] dicts with
    id/instruction/response/..., "sample_weight": [B]}`` (0 on padding copies).

    Args:
        path: JSONL file or saved HF dataset folder.
        instruction_field, response_field, id_field: field names in the source.
        split: split of a saved ``DatasetDict``.
        batch_size: texts per batch.
        rank, world_size: override the trainer's (tests, or splitting by hand); by default
            :meth:`setup` reads ``trainer.global_rank`` and ``trainer.world_size``.
        limit: keep only the first ``limit`` records (smoke runs).
    """

    def __init__(
        self, *, path: str, instruction_field: str = "instruction", response_field: str = "response",
        id_field: str = "id", split: str | None = None, batch_size: int = 16,
        rank: int | None = None, world_size: int | None = None, limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.split, self.batch_size, self.limit = path, split, batch_size, limit
        self.fields = dict(instruction_field=instruction_field, response_field=response_field, id_field=id_field)
        self.rank, self.world_size = rank, world_size
        self.records: list[dict[str, Any]] = []
        self.excluded: frozenset[str] = frozenset()

    def setup(self, stage: str | None = None) -> None:
        self.records = load_instructions(self.path, split=self.split, **self.fields)
        if self.limit is not None:
            self.records = self.records[: self.limit]
        rank, world_size = trainer_rank(getattr(self, "trainer", None))
        if self.rank is None:
            self.rank = rank
        if self.world_size is None:
            self.world_size = world_size

    def exclude_keys(self, keys: Collection[str]) -> int:
        """Leave out the instructions whose ids are in ``keys`` (written by an earlier run).

        Every rank must pass the same ``keys`` (the writer broadcasts them from rank 0): the ranks
        then split the same remainder and run the same number of batches.

        Returns:
            How many instructions are left to predict, over all ranks.

        Raises:
            ValueError: ``keys`` holds ids this input does not have (the output was written from
                another instruction set).
        """
        if not self.records:
            self.setup("predict")
        ids = {r["id"] for r in self.records}
        unknown = [k for k in keys if k not in ids]
        if unknown:
            raise ValueError(
                f"the output folder holds {len(unknown)} ids that {self.path} does not (e.g. {sorted(unknown)[:3]}): "
                "it was written from another instruction set; use another output folder"
            )
        self.excluded = frozenset(keys)
        return len(ids) - len(self.excluded)

    def predict_dataloader(self) -> DataLoader:
        if not self.records:
            self.setup("predict")
        todo = [r for r in self.records if r["id"] not in self.excluded]
        indices, per_rank = rank_slice(len(todo), self.rank, self.world_size)
        items = [(todo[i], 1.0) for i in indices]
        # Padding copies (weight 0) keep the batch count equal on every rank.
        filler = todo[indices[0] if indices else 0] if todo else None
        items += [(filler, 0.0)] * (per_rank - len(indices)) if filler is not None else []
        return DataLoader(_Items(items), batch_size=self.batch_size, shuffle=False, collate_fn=_collate)
