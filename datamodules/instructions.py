"""Stage-3 data: synthetic spoken instructions (token shards) mixed with text-only instructions.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417), stage 3: the LLM is tuned on
instructions whose speech was *synthesized* as semantic tokens by stage 2, with text-only pairs mixed in
so it keeps following written instructions. A token shard sample is ``json`` (``instruction``,
``response``, ``n_frames``, or only ``text`` for plain tokenized speech) plus ``codes.npy`` ``[Q, T]``.

The tokenizer is bound late (:meth:`InstructionDataModule.bind`, called by the LightningModule that owns
it), so this module never imports ``models/``: the example builder is injected as a callable and gets a
spoken row's codes, which it turns into audio slots or sound tokens as its model reads them. For the
optional CTC loss (DiffusionGemma ASR) a bound ``ctc_targets`` tokenizes the instruction text of every
spoken example (what stage 2 spoke).

Two ways to serve the rows. By default they are *streamed* (``datamodules/instruction_stream.py``):
read by the shard reader of stages 1 and 2, built into examples in the loader's workers and batched by
a token budget in length buckets, so host memory does not grow with the set. With ``global_batch_size``
the in-memory path of the first versions: every row read at setup, every example built when the loader
is made, batches sorted by length within windows and dealt so that a run takes the same optimizer
steps on the same examples on any number of devices (a stream splits by shards, which cannot give that).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.instruction_stream import (
    InstructionStream,
    StreamSource,
    example_builder,
    stream_batch_spec,
    text_index,
)
from datamodules.pipeline import SampleError, read_decoded
from datamodules.ranks import split_for_ranks, split_global_batches, trainer_rank
from datamodules.resume import fit_position
from datamodules.shards import resolve_shards
from datamodules.sources import ShardSpec, parse_sources, repeat_count
from datamodules.speech import _EpochLoader

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
    """Synthetic spoken instructions + text instructions for stage 3, streamed (default) or in memory.

    Args:
        train_shards: Token shards of spoken instructions (a folder, brace pattern or list; ``index.json``),
            or several weighted sources (``[{shards: ..., weight: w}, ...]``, ``datamodules/sources.py``);
            streamed, a source may be a ``.jsonl`` file of text-only pairs with its own weight.
        val_shards: Token shards for the validation loss.
        text_jsonl: Text-only instruction pairs mixed into training.
        text_ratio: Text-only examples per spoken example in an epoch (0.25: one text per four spoken);
            the text pool is sampled with replacement when it is smaller than needed (streamed: its
            weight, ``text_ratio x spoken / text rows``, repeats it and subsamples the fraction).
        instruction_key: Key of the instruction text in a shard's json (what stage 2 spoke).
        response_key: Key of the answer in a shard's json (stage-2 synthetic shards: ``response``).
        closed_task: Derive the answer from the instruction instead (``repeat``) for token shards
            that only carry a transcript.
        spoken_instruction_text: Optional text placed before the audio in the user turn.
        batch_size: Examples per batch and device (streamed: at most).
        global_batch_size: Examples per optimizer step over all devices instead (``batch_size`` is then
            ignored), in memory: the length-bucketed batches of one process are dealt out, each split over
            the ranks, so a run takes the same steps on the same examples on any number of devices, and a
            result calibrated on one device (the demo's gate) holds on several.
        bucket_window: In memory: batches whose examples are sorted by length together.
        max_batch_tokens: Streamed: cap on a batch's padded tokens (``examples x longest``, estimated
            from the index before any example is built: see ``tokens_per_frame``); ``None``: no cap.
        bucket_boundaries: Streamed: example lengths in tokens that separate length buckets (examples
            share a batch only within their bucket); ``None``: one bucket.
        shuffle_buffer: Streamed: examples in the in-stream shuffle buffer (training).
        epoch_mode: Streamed: ``exact`` (each row once per epoch, or as its source's weight says, the
            same number of batches on every rank) or ``resampled`` (``epoch_batches`` per rank, shards
            drawn with replacement).
        epoch_batches: Streamed, resampled: batches per rank per epoch.
        tokens_per_frame: Streamed: LLM positions per code frame in the estimate (native audio 1, a
            projector stacking k 1/k, sound tokens the levels written per frame).
        prompt_tokens: Streamed: estimated tokens of a row besides its audio or its JSONL bytes / 4.
        frame_rate: Code frames per second (the index records seconds).
        text_chunk: Streamed: JSONL rows read as one "shard".
        num_workers: DataLoader workers (streamed: they read and build examples; in memory they only
            collate, so 0).
        seed: Shuffling and mixing seed (the epoch is added).
    """

    def __init__(
        self,
        *,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
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
        max_batch_tokens: int | None = None,
        bucket_boundaries: list[int] | None = None,
        shuffle_buffer: int = 256,
        epoch_mode: Literal["exact", "resampled"] = "exact",
        epoch_batches: int | None = None,
        tokens_per_frame: float = 1.0,
        prompt_tokens: int = 24,
        frame_rate: float = 25.0,
        text_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if text_ratio < 0:
            raise ValueError(f"text_ratio must be >= 0, got {text_ratio}")
        if text_ratio > 0 and not text_jsonl:
            raise ValueError("text_ratio > 0 needs text_jsonl")
        if (response_key is None) == (closed_task is None):
            raise ValueError("set exactly one of response_key or closed_task")
        if closed_task is not None and closed_task not in CLOSED_TASKS:
            raise ValueError(f"closed_task must be one of {sorted(CLOSED_TASKS)}, got {closed_task!r}")
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if global_batch_size is None and epoch_mode == "resampled" and not epoch_batches:
            raise ValueError("epoch_mode='resampled' needs epoch_batches")
        self.train_shards, self.val_shards, self.text_jsonl = train_shards, val_shards, text_jsonl
        self.text_ratio = text_ratio
        self.read_kwargs = {"instruction_key": instruction_key, "response_key": response_key, "closed_task": closed_task}
        self.spoken_instruction_text = spoken_instruction_text
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.global_batch_size = global_batch_size
        self.bucket_window = bucket_window
        self.streamed = global_batch_size is None
        self.stream_options = {
            "spec": stream_batch_spec(batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                      bucket_boundaries=bucket_boundaries),
            "tokens_per_frame": tokens_per_frame, "prompt_tokens": prompt_tokens, "frame_rate": frame_rate,
            "seed": seed,
        }  # fmt: skip
        self.shuffle_buffer, self.epoch_mode, self.epoch_batches = shuffle_buffer, epoch_mode, epoch_batches
        self.text_chunk = text_chunk
        self._build: Callable | None = None
        self._collate: Callable | None = None
        self._ctc_targets: Callable | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._streams: dict[str, InstructionStream] = {}

    def bind(
        self,
        *,
        build_example: Callable[..., dict],
        collate: Callable[[list[dict]], dict],
        ctc_targets: Callable[[str], Any] | None = None,
        text_teacher: bool = False,
    ) -> InstructionDataModule:
        """Late binding of the tokenizer.

        Args:
            build_example: ``build_example(instruction_text=, codes=, response=)`` -> example; ``codes`` is
                ``[Q, T]`` for a spoken row (text: ``spoken_instruction_text``) and ``None`` for a text row
                (text: its instruction). It keeps ``codes`` in the example when its model reads codes.
            collate: Examples -> batch (streamed, each example also carries ``sample_weight``: 0 in the
                padding batches that keep ranks in step).
            ctc_targets: Instruction text -> target ids ``[S]`` (the LLM's tokens), for the CTC loss.
            text_teacher: Give every spoken example a ``teacher``: the same instruction as text (its
                ``instruction_key``, in place of the audio) with the same response (text rows have none).
        """
        self._build = partial(_build_row, build_example, self.spoken_instruction_text, text_teacher)
        self._collate, self._ctc_targets = collate, ctc_targets
        for stream in self._streams.values():
            self._bind_stream(stream)
        return self

    def _bind_stream(self, stream: InstructionStream) -> None:
        closed = self.read_kwargs["closed_task"]
        stream.transform = example_builder(
            build=self._build, ctc_targets=self._ctc_targets, instruction_key=self.read_kwargs["instruction_key"],
            response_key=self.read_kwargs["response_key"], closed_task=CLOSED_TASKS[closed] if closed else None,
        )  # fmt: skip
        stream.collate = self._collate

    def setup(self, stage: str | None = None) -> None:
        if self.streamed:
            self._setup_streams()
            return
        if "train" not in self._rows:
            self._rows["train"] = read_token_shards(self.train_shards, **self.read_kwargs)
            self._rows["text"] = read_text_jsonl(self.text_jsonl) if self.text_jsonl else []
        if self.val_shards and "val" not in self._rows:
            self._rows["val"] = read_token_shards(self.val_shards, **self.read_kwargs)

    # ---- streamed ------------------------------------------------------------------------------
    def _sources(self, spec: ShardSpec, *, name: str) -> list[StreamSource]:
        sources = []
        for source in parse_sources(spec, name=name):
            if isinstance(source.shards, str) and source.shards.endswith(".jsonl"):
                text = text_index(source.shards, chunk=self.text_chunk, prompt_tokens=self.stream_options["prompt_tokens"])
                sources.append(StreamSource(text.index, source.weight, text.chunks))
            else:
                sources.append(StreamSource(resolve_shards(source.spec()), source.weight))
        return sources

    def _setup_streams(self) -> None:
        if "train" not in self._streams:
            sources = self._sources(self.train_shards, name="train_shards")
            if self.text_ratio > 0:
                text = text_index(self.text_jsonl, chunk=self.text_chunk, prompt_tokens=self.stream_options["prompt_tokens"])
                spoken = sum(repeat_count(s.weight, s.index.samples) for s in sources if s.chunks is None)
                # As many text rows an epoch as the in-memory path draws: round(text_ratio x spoken).
                text.weight = round(self.text_ratio * spoken) / text.index.samples
                sources.append(text)
            self._streams["train"] = InstructionStream(
                sources=sources, mode=self.epoch_mode, epoch_batches=self.epoch_batches, shuffle=True,
                buffer=self.shuffle_buffer, **self.stream_options,
            )  # fmt: skip
        if self.val_shards and "val" not in self._streams:
            sources = self._sources(self.val_shards, name="val_shards")
            if any(s.weight != 1 for s in sources):
                raise ValueError("val_shards: weights apply to training only; validation reads every row once")
            self._streams["val"] = InstructionStream(sources=sources, mode="exact", shuffle=False, buffer=0, **self.stream_options)
        for stream in self._streams.values():
            if self._build is not None:
                self._bind_stream(stream)

    def _stream_loader(self, split: str) -> DataLoader:
        if self._build is None:
            raise RuntimeError("InstructionDataModule.bind(...) must be called (the LightningModule does it)")
        if split not in self._streams:
            self.setup(None)
        stream = self._streams[split]
        rank, world = trainer_rank(getattr(self, "trainer", None))
        stream.set_distributed(rank=rank, world_size=world, num_workers=self.num_workers)
        train = split == "train"
        if train:  # the epoch sizes the loader (len) before Lightning iterates it
            stream.set_epoch(self._position()[0])
        return _EpochLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            position_fn=self._position if train else None)  # fmt: skip

    # ---- in memory -----------------------------------------------------------------------------
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
        if self.streamed:
            return self._stream_loader("train")
        epoch, skip = self._position()
        return self._loader(self._train_rows(epoch), seed=self.seed + epoch, skip=skip)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        if self.streamed:
            return self._stream_loader("val")
        return self._loader(self._rows["val"], seed=self.seed)


def _build_row(build_example: Callable[..., dict], spoken_text: str | None, teacher: bool, row: dict[str, Any]) -> dict:
    """A row -> ``build_example``: a spoken row's text is ``spoken_text`` (its instruction was spoken).

    With ``teacher``, a spoken example also carries ``teacher``: the prompt with the instruction's text
    where the audio was (after ``spoken_text``, as Ultravox's text teacher reads the transcript), the same response.
    """
    if "codes" not in row:
        return build_example(instruction_text=row["instruction"], codes=None, response=row["response"])
    example = build_example(instruction_text=spoken_text, codes=row["codes"], response=row["response"])
    if teacher:
        text = f"{spoken_text}\n{row['instruction']}" if spoken_text else row["instruction"]
        example["teacher"] = build_example(instruction_text=text, codes=None, response=row["response"])
    return example
