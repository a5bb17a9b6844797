"""Stage-3 data: synthetic spoken instructions (token shards) mixed with text-only instructions.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417), stage 3: the LLM is tuned on
instructions whose speech was *synthesized* as semantic tokens by stage 2, with text-only pairs mixed in
so it keeps following written instructions. A token shard sample is ``json`` (``instruction``,
``response``, ``n_frames``, or only ``text`` for plain tokenized speech) plus ``codes.npy`` ``[Q, T]``.

The tokenizer is bound late (:meth:`InstructionDataModule.bind`, called by the LightningModule that owns
it), so this module never imports ``models/``: the example builder is injected as a callable and gets a
spoken row's codes, which it turns into audio slots or sound tokens as its model reads them. For the
optional CTC loss (DiffusionGemma ASR) a bound ``ctc_targets`` tokenizes the instruction text of every
spoken example (what stage 2 spoke). Batches are length-bucketed (sorted within a window of batches)
so padding stays small.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.pipeline import SampleError, read_decoded
from datamodules.ranks import split_for_ranks, split_global_batches, trainer_rank
from datamodules.resume import fit_position

__all__ = [
    "CLOSED_TASKS", "OPEN_TASKS", "InstructionDataModule", "InstructionDataset", "length_sorted_batches",
    "read_token_shards", "repeat",
]

def repeat(text: str) -> str:
    """The open task "repeat what was said": the answer is the transcript itself (scored by WER/CER)."""
    if not text.strip():
        raise ValueError("repeat: the transcript is empty")
    return " ".join(text.split())


# Tasks whose answer is derived from the transcript (``closed_task=``); ``repeat`` is open (``OPEN_TASKS``:
# scored by WER/CER). A task whose answer the data carries (a closed set such as the demo's digits, see
# ``demo.tasks``) needs no entry here: ``response_key=`` names its json field.
CLOSED_TASKS: dict[str, Callable[[str], str]] = {"repeat": repeat}
OPEN_TASKS = frozenset({"repeat"})


def read_token_shards(
    spec: str, *, instruction_key: str, response_key: str | None, closed_task: str | None
) -> list[dict[str, Any]]:
    """Token shards -> ``[{"key", "instruction", "response", "codes" [Q, T] long}]``.

    Read and decoded by the shared shard reader (:func:`datamodules.pipeline.read_decoded`, the
    ``read_shard`` and ``decode_sample`` the speech datamodule streams token shards with). The
    response is ``json[response_key]`` or ``CLOSED_TASKS[closed_task](json[instruction_key])``.

    Raises:
        ValueError: When a sample lacks the key, or neither/both of ``response_key``/``closed_task`` are set.
    """
    if (response_key is None) == (closed_task is None):
        raise ValueError("set exactly one of response_key or closed_task")
    if closed_task is not None and closed_task not in CLOSED_TASKS:
        raise ValueError(f"closed_task must be one of {sorted(CLOSED_TASKS)}, got {closed_task!r}")
    out = []
    try:
        for path, sample in read_decoded(spec, fields="tokens"):
            key, meta = sample["__key__"], sample["meta"]
            if instruction_key not in meta:
                raise ValueError(f"{path}:{key} lacks json[{instruction_key!r}]")
            if response_key is not None and response_key not in meta:
                raise ValueError(f"{path}:{key} lacks json[{response_key!r}]")
            response = meta[response_key] if response_key else CLOSED_TASKS[closed_task](meta[instruction_key])
            out.append({
                "key": key,
                "instruction": meta[instruction_key],
                "response": response,
                "codes": torch.from_numpy(sample["codes"]),  # int64 [Q, T]
            })  # fmt: skip
    except SampleError as err:  # the shared reader's reason: missing_json, missing_codes, bad_codes, ...
        raise ValueError(f"{spec}: a token shard sample cannot be read ({err})") from err
    return out


def read_text_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Text-only pairs, one JSON object a line with ``instruction`` and ``response``."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        if "instruction" not in obj or "response" not in obj:
            raise ValueError(f"{path}:{i + 1}: needs 'instruction' and 'response'")
        rows.append({"key": obj.get("id", f"text-{i}"), "instruction": obj["instruction"], "response": obj["response"]})
    return rows


class InstructionDataset(Dataset):
    """Spoken rows (with ``codes``) and text rows, tokenized on access by the bound ``build``.

    Args:
        rows: ``read_token_shards`` / ``read_text_jsonl`` rows.
        build: Row -> example (``input_ids``, ``labels``, ... and ``codes`` when the model reads them).
        ctc_targets: Optional instruction text -> target ids ``[S]``, added to spoken examples as
            ``ctc_targets``.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        *,
        build: Callable[[dict[str, Any]], dict],
        ctc_targets: Callable[[str], Any] | None = None,
    ) -> None:
        self.rows, self.build, self.ctc_targets = rows, build, ctc_targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        example = self.build(row)
        if self.ctc_targets is not None and "codes" in row:
            example["ctc_targets"] = self.ctc_targets(row["instruction"])
        return example


def length_sorted_batches(lengths: list[int], *, batch_size: int, seed: int, window: int = 16) -> list[list[int]]:
    """Shuffle, then sort each window of ``window x batch_size`` by length and cut it into batches.

    Not :func:`datamodules.pipeline.bucket_batches` (a stream cut by padded seconds within fixed
    length buckets): stage 3's examples are in memory with known token counts, so batches have a fixed
    size and their order is shuffled as a whole.

    Returns:
        Batches of indices; every index appears exactly once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = window * batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class _ResumedBatches:
    """An epoch's batches of indices from batch ``skip`` on, with the whole epoch's length.

    Lightning counts a sized loader's batches from the restored position (``skip``) up to
    ``len()``, so a fit resumed inside an epoch must see the full length and the remaining batches.
    """

    def __init__(self, batches: list[list[int]], skip: int = 0) -> None:
        self.batches, self.skip = batches, skip

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.skip :])


class InstructionDataModule(L.LightningDataModule):
    """Synthetic spoken instructions + text instructions for stage 3.

    Args:
        train_shards: Token shards of spoken instructions (a folder, brace pattern or list; ``index.json``).
        val_shards: Token shards for the validation loss.
        text_jsonl: Text-only instruction pairs mixed into training.
        text_ratio: Text-only examples per spoken example in an epoch (0.25: one text per four spoken);
            the text pool is sampled with replacement when it is smaller than needed.
        instruction_key: Key of the instruction text in a shard's json (what stage 2 spoke).
        response_key: Key of the answer in a shard's json (stage-2 synthetic shards: ``response``).
        closed_task: Derive the answer from the instruction instead (``repeat``) for token shards
            that only carry a transcript.
        spoken_instruction_text: Optional text placed before the audio in the user turn.
        batch_size: Examples per batch and device.
        global_batch_size: Examples per optimizer step over all devices instead (``batch_size`` is then
            ignored): the length-bucketed batches of one process are dealt out, each split over the
            ranks, so a run takes the same steps on the same examples on any number of devices, and a
            result calibrated on one device (the demo's gate) holds on several.
        bucket_window: Batches whose examples are sorted by length together: larger windows pad less
            but give more uniform batches (all text-only or all spoken).
        num_workers: DataLoader workers; they only collate (examples are built when the loader is
            made), so 0 is the default of the shipped configs.
        seed: Shuffling and mixing seed (the epoch is added).
    """

    def __init__(
        self,
        *,
        train_shards: str,
        val_shards: str | None = None,
        text_jsonl: str | None = None,
        text_ratio: float = 0.0,
        instruction_key: str = "instruction",
        response_key: str | None = "response",
        closed_task: str | None = None,
        spoken_instruction_text: str | None = None,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        bucket_window: int = 16,
    ) -> None:
        super().__init__()
        if text_ratio < 0:
            raise ValueError(f"text_ratio must be >= 0, got {text_ratio}")
        if text_ratio > 0 and not text_jsonl:
            raise ValueError("text_ratio > 0 needs text_jsonl")
        self.train_shards, self.val_shards, self.text_jsonl = train_shards, val_shards, text_jsonl
        self.text_ratio = text_ratio
        self.read_kwargs = {"instruction_key": instruction_key, "response_key": response_key, "closed_task": closed_task}
        self.spoken_instruction_text = spoken_instruction_text
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.global_batch_size = global_batch_size
        self.bucket_window = bucket_window
        self._build: Callable | None = None
        self._collate: Callable | None = None
        self._ctc_targets: Callable | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def bind(
        self,
        *,
        build_example: Callable[..., dict],
        collate: Callable[[list[dict]], dict],
        ctc_targets: Callable[[str], Any] | None = None,
    ) -> InstructionDataModule:
        """Late binding of the tokenizer.

        Args:
            build_example: ``build_example(instruction_text=, codes=, response=)`` -> example; ``codes`` is
                ``[Q, T]`` for a spoken row (text: ``spoken_instruction_text``) and ``None`` for a text row
                (text: its instruction). It keeps ``codes`` in the example when its model reads codes.
            collate: Examples -> batch.
            ctc_targets: Instruction text -> target ids ``[S]`` (the LLM's tokens), for the CTC loss.
        """

        def build(row: dict[str, Any]) -> dict:
            if "codes" in row:
                return build_example(
                    instruction_text=self.spoken_instruction_text, codes=row["codes"], response=row["response"]
                )
            return build_example(instruction_text=row["instruction"], codes=None, response=row["response"])

        self._build, self._collate, self._ctc_targets = build, collate, ctc_targets
        return self

    def setup(self, stage: str | None = None) -> None:
        if "train" not in self._rows:
            self._rows["train"] = read_token_shards(self.train_shards, **self.read_kwargs)
            self._rows["text"] = read_text_jsonl(self.text_jsonl) if self.text_jsonl else []
        if self.val_shards and "val" not in self._rows:
            self._rows["val"] = read_token_shards(self.val_shards, **self.read_kwargs)

    def _epoch(self) -> int:
        return self._position()[0]

    def _position(self) -> tuple[int, int]:
        """The training epoch to make and its batches already trained (a resumed fit skips them)."""
        return fit_position(getattr(self, "trainer", None))

    def _train_rows(self, epoch: int) -> list[dict[str, Any]]:
        spoken, text = self._rows["train"], self._rows["text"]
        n_text = round(self.text_ratio * len(spoken))
        if not n_text:
            return list(spoken)
        rng = random.Random(self.seed + epoch)
        picks = rng.sample(text, n_text) if n_text <= len(text) else [rng.choice(text) for _ in range(n_text)]
        return spoken + picks

    def _loader(self, rows: list[dict[str, Any]], *, seed: int, skip: int = 0) -> DataLoader:
        if self._build is None:
            raise RuntimeError("InstructionDataModule.bind(...) must be called (the LightningModule does it)")
        dataset = InstructionDataset(rows, build=self._build, ctc_targets=self._ctc_targets)
        # Each example is built once, here: its real token count (prompt + audio slots + response)
        # decides its bucket, so a short text-only pair is never batched with a long spoken one, and
        # the loader only collates (workers would tokenize every example a second time).
        examples = [dataset[i] for i in range(len(dataset))]
        lengths = [len(e["input_ids"]) for e in examples]
        rank, world = trainer_rank(getattr(self, "trainer", None))
        size = self.global_batch_size or self.batch_size
        batches = length_sorted_batches(lengths, batch_size=size, seed=seed, window=self.bucket_window)
        if self.global_batch_size:
            batches = split_global_batches(batches, world)[rank]
        else:
            batches = split_for_ranks(batches, world)[rank]
        return DataLoader(
            examples, batch_sampler=_ResumedBatches(batches, skip), collate_fn=self._collate, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        epoch, skip = self._position()
        return self._loader(self._train_rows(epoch), seed=self.seed + epoch, skip=skip)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._rows["val"], seed=self.seed) if self.val_shards else []
