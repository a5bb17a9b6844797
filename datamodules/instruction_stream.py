"""Stage 3's data as a stream: instruction token shards and text-only JSONL through the shared shard reader.

The synthetic spoken instructions (token shards, ``json`` + ``codes.npy``) and the text-only pairs (a
JSONL file, one ``{"instruction", "response"}`` a line) are read by
:class:`datamodules.shard_dataset.ShardDataset`, the dataset of stages 1 and 2: exact epochs planned
from the indexes alone (every sample once, or as its source's weight says, equal batch counts on every
rank), or resampled ones; per-rank and per-worker splitting; a bounded shuffle buffer and length
buckets. Nothing holds the rows: a worker reads its shards, builds each example (the tokenizer is bound
late, as the in-memory path binds it) and batches it.

A JSONL file becomes a source of its own: :func:`text_index` scans it once for the byte offset of every
``chunk`` lines, so a chunk is read like a shard (a seek and ``chunk`` lines) and the planner treats it
as one. Batches are cut by estimated tokens, known before any example is built: a spoken row's
``prompt_tokens + frames x tokens_per_frame`` (its frames from the index's seconds), a text row's bytes
/ ``bytes_per_token`` (plus ``prompt_tokens``). Resampled epochs batch on the built examples' real
token counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datamodules.pipeline import BatchSpec, SampleError, SkipCounter, decode_sample
from datamodules.shard_dataset import ShardDataset
from datamodules.shards import ShardIndex, ShardInfo

__all__ = ["InstructionStream", "StreamSource", "TextChunk", "example_builder", "stream_batch_spec", "text_index"]

TEXT = "__text__"  # marks a raw sample read from a JSONL chunk


@dataclass(frozen=True)
class TextChunk:
    """Where one chunk of a JSONL file starts: its byte offset and the number of its first line (0-based)."""

    path: str
    offset: int
    first_line: int


@dataclass
class StreamSource:
    """One source of a stage-3 split: token shards, or a JSONL file cut into chunks (``chunks`` set)."""

    index: ShardIndex
    weight: float = 1.0
    chunks: list[TextChunk] | None = None


def text_index(path: str, *, chunk: int = 1024, bytes_per_token: float = 4.0, prompt_tokens: int = 24) -> StreamSource:
    """Scan a JSONL file once: chunks of ``chunk`` non-empty lines, each line's estimated tokens.

    Returns:
        A source whose ``index`` has one shard per chunk (``durations``: estimated tokens per line) and
        whose ``chunks`` say where each starts.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    path = os.path.abspath(path)
    infos: list[ShardInfo] = []
    chunks: list[TextChunk] = []
    lengths: list[float] = []
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f):
            if line.strip():
                if not lengths:
                    chunks.append(TextChunk(path, offset, number))
                lengths.append(round(prompt_tokens + len(line) / bytes_per_token, 1))
                if len(lengths) == chunk:
                    infos.append(ShardInfo(url=path, samples=len(lengths), seconds=sum(lengths), durations=lengths))
                    lengths = []
            offset += len(line)
    if lengths:
        infos.append(ShardInfo(url=path, samples=len(lengths), seconds=sum(lengths), durations=lengths))
    if not infos:
        raise ValueError(f"{path}: no instruction lines")
    return StreamSource(ShardIndex(shards=infos, kind="text", root="/"), chunks=chunks)


def _read_chunk(chunk: TextChunk, samples: int):
    """``(position, raw sample)`` for the ``samples`` non-empty lines of a chunk; the key is ``id`` or the line."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.offset)
        pos, number = 0, chunk.first_line
        while pos < samples:
            line = f.readline()
            if not line:
                raise EOFError(f"{chunk.path} ended at line {number}: changed since it was indexed?")
            if line.strip():
                yield pos, {"__key__": f"text-{number}", "json": line, TEXT: True}
                pos += 1
            number += 1


class InstructionStream(ShardDataset):
    """:class:`ShardDataset` over stage-3 sources: token shards and JSONL chunks, batched by estimated tokens.

    Yields batches of built examples (the ``transform``, bound by the datamodule, builds them; the
    ``collate`` pads or packs them). The plan's lengths are estimated tokens, so ``spec``'s
    ``max_batch_seconds`` is a token budget (``len(batch) x longest``) and its buckets token lengths.

    Args:
        sources: The split's sources with their weights (see ``datamodules/sources.py``).
        tokens_per_frame: LLM positions per code frame (native audio: 1; a projector stacking k: 1/k;
            sound tokens: the levels written per frame).
        prompt_tokens: Estimated tokens of a spoken row around its audio (template, response).
        **kwargs: ``ShardDataset``'s ``mode``, ``spec``, ``epoch_batches``, ``shuffle``, ``buffer``,
            ``seed``, ``frame_rate``.
    """

    def __init__(self, *, sources: Sequence[StreamSource], tokens_per_frame: float = 1.0, prompt_tokens: int = 24,
                 **kwargs: Any) -> None:  # fmt: skip
        indexes = [s.index for s in sources]
        weights = [s.weight for s in sources]
        single = len(sources) == 1 and weights == [1.0]
        super().__init__(index=indexes[0] if single else indexes, weights=None if single else weights,
                         fields="tokens", **kwargs)  # fmt: skip
        self.chunks: dict[int, TextChunk] = {}
        shard = 0
        for source in sources:
            for i in range(len(source.index.shards)):
                if source.chunks is not None:
                    self.chunks[shard] = source.chunks[i]
                shard += 1
        rate = self.frame_rate * tokens_per_frame
        self.durations = [
            durations if s in self.chunks else [prompt_tokens + d * rate for d in durations]
            for s, durations in enumerate(self.durations)
        ]

    def __len__(self) -> int:
        """Batches this rank yields this epoch (Lightning sizes epochs, and ``val_check_interval``, by it)."""
        return self.num_batches()

    def _read(self, shard: int):
        chunk = self.chunks.get(shard)
        if chunk is None:
            return super()._read(shard)
        return _read_chunk(chunk, self.index.shards[shard].samples)

    def _decode(self, raw: dict[str, Any], counter: SkipCounter) -> dict[str, Any] | None:
        if not raw.get(TEXT):
            return super()._decode(raw, counter)
        try:  # a text row: its json only (fields that match no member decode nothing else)
            sample = decode_sample(raw, fields="text", sample_rate=self.sample_rate, frame_rate=self.frame_rate)
            sample = self.transform(sample) if self.transform is not None else sample
        except SampleError as e:
            counter.note(e.reason, raw["__key__"], str(e))
            return None
        if sample is None:
            counter.note("transform_rejected", raw["__key__"])
        return sample


def stream_batch_spec(*, batch_size: int, max_batch_tokens: int | None, bucket_boundaries: Sequence[int] | None) -> BatchSpec:
    """The ``BatchSpec`` of a token budget: at most ``batch_size`` examples and ``max_batch_tokens`` padded tokens."""
    return BatchSpec(max_batch_seconds=float(max_batch_tokens) if max_batch_tokens else float("inf"),
                     max_batch_size=batch_size, bucket_boundaries=tuple(float(b) for b in bucket_boundaries or ()))  # fmt: skip


def example_builder(
    *,
    build: Callable[[dict[str, Any]], dict],
    ctc_targets: Callable[[str], Any] | None,
    instruction_key: str,
    response_key: str | None,
    closed_task: Callable[[str], str] | None,
) -> Callable[[dict[str, Any]], dict]:
    """Decoded sample -> example: the transform the stream runs in its workers.

    A spoken row (``codes``) answers ``json[response_key]`` or ``closed_task(json[instruction_key])``;
    a text row needs ``instruction`` and ``response``. A row without them is skipped and counted
    (``missing_instruction``, ``missing_response``). The example's ``seconds`` is its real token count
    (what resampled epochs batch on).
    """
    return _Builder(build, ctc_targets, instruction_key, response_key, closed_task)


class _Builder:
    """A picklable :func:`example_builder` (workers started by spawn get a copy)."""

    def __init__(self, build, ctc_targets, instruction_key, response_key, closed_task) -> None:
        self.build, self.ctc_targets = build, ctc_targets
        self.instruction_key, self.response_key, self.closed_task = instruction_key, response_key, closed_task

    def __call__(self, sample: dict[str, Any]) -> dict:
        meta = sample["meta"]
        spoken = "codes" in sample
        key = self.instruction_key if spoken else "instruction"
        if key not in meta:
            raise SampleError("missing_instruction", f"no json[{key!r}]")
        if spoken and self.response_key is None:
            response = self.closed_task(meta[key])
        else:
            name = self.response_key if spoken else "response"
            if name not in meta:
                raise SampleError("missing_response", f"no json[{name!r}]")
            response = meta[name]
        row = {"instruction": meta[key], "response": response}
        if spoken:
            row["codes"] = torch.from_numpy(sample["codes"])
        example = self.build(row)
        if self.ctc_targets is not None and spoken:
            example["ctc_targets"] = self.ctc_targets(meta[key])
        example["seconds"] = float(example["input_ids"].numel())
        example["__key__"] = sample["__key__"]
        return example

