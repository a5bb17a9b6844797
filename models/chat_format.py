"""Stage-3 training examples in the model's own chat template, and sequence packing.

A spoken instruction is a user turn whose audio is written the way ``Gemma4Processor`` expands it:
the template's single ``<|audio|>`` placeholder becomes ``<|audio>`` + N x ``<|audio|>`` +
``<audio|>``, N being the number of audio frames after Gemma 4's own audio path (25 frames/s: the
RVQ code frames of a synthetic instruction, or the audio tower's valid outputs for real speech,
see ``audio_token_count``). The loss covers the response and its end-of-turn token only.

Packing follows transformers' packed-sequence format: examples are concatenated in one row with
``position_ids`` restarting at 0 per example and *no* ``attention_mask``; transformers'
``masking_utils`` then builds a block-diagonal causal mask (sliding windows included) from the
position restarts, so no example attends to another, for sdpa, eager and flash attention alike.
Padding at the end of a row forms its own block and carries no loss. ``collate_instructions`` makes
stage 3's training batches either way, with the audio of each batch in the order its slots are filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "audio_token_count",
    "build_example",
    "build_prompt",
    "collate_instructions",
    "collate_packed",
    "collate_padded",
    "end_of_turn_id",
    "pack_examples",
    "teacher_token_mask",
]

IGNORE_INDEX = -100

_EOT_CANDIDATES = ("<turn|>", "<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def end_of_turn_id(tokenizer) -> int:
    """The id that ends a model turn: ``tokenizer.eot_token`` (Gemma 4), a known end-of-turn token, or eos."""
    vocab = tokenizer.get_vocab()
    for token in (getattr(tokenizer, "eot_token", None), *_EOT_CANDIDATES):
        if token and token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no end-of-turn token and no eos token")
    return tokenizer.eos_token_id


def audio_token_count(
    num_samples: int, *, frame_length: int = 320, hop_length: int = 160, max_tokens: int = 750
) -> int:
    """Audio soft tokens Gemma 4 makes of ``num_samples`` 16 kHz samples (its processor's arithmetic).

    Mel frames of ``frame_length`` + 1 samples every ``hop_length`` after a half-frame left pad, then two
    stride-2 convolutions (kernel 3, pad 1): 40 ms per token, 25 tokens/s.
    """
    t = (num_samples + frame_length // 2 - (frame_length + 1)) // hop_length + 1
    if t <= 0:
        return 0
    for _ in range(2):
        t = (t + 2 - 3) // 2 + 1
    return min(t, max_tokens)


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _audio_tokens(tokenizer) -> tuple[str, str, str]:
    names = ("audio_token", "boa_token", "eoa_token")
    tokens = tuple(getattr(tokenizer, n, None) for n in names)
    if any(t is None for t in tokens):
        raise ValueError(f"tokenizer lacks Gemma 4's audio tokens ({', '.join(names)}): cannot place audio")
    return tokens  # type: ignore[return-value]


def _messages(instruction_text: str | None, audio_frames: int | None, system: str | None) -> list[dict]:
    if not instruction_text and audio_frames is None:
        raise ValueError("an example needs instruction_text, audio_frames or both")
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if audio_frames is None:
        # Plain string content: every chat template takes it (Llama 3's and Gemma 3's text-only ones
        # included), while typed content lists are a multimodal-template feature.
        return [*messages, {"role": "user", "content": instruction_text}]
    content: list[dict[str, Any]] = []
    if instruction_text:
        content.append({"type": "text", "text": instruction_text})
    if audio_frames is not None:
        if audio_frames < 1:
            raise ValueError(f"audio_frames must be >= 1, got {audio_frames}")
        content.append({"type": "audio"})
    return [*messages, {"role": "user", "content": content}]


def _expand_audio(tokenizer, text: str, audio_frames: int | None) -> str:
    """Replace the template's single audio placeholder by Gemma4Processor's expansion."""
    if audio_frames is None:
        return text
    audio, boa, eoa = _audio_tokens(tokenizer)
    if text.count(audio) != 1:
        raise ValueError(
            f"expected one {audio!r} placeholder in the rendered prompt, found {text.count(audio)}"
        )
    return text.replace(audio, boa + audio * audio_frames + eoa)


def _audio_mask(tokenizer, input_ids: torch.Tensor, audio_frames: int | None) -> torch.Tensor:
    if audio_frames is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    mask = input_ids == tokenizer.convert_tokens_to_ids(_audio_tokens(tokenizer)[0])
    if int(mask.sum()) != audio_frames:
        raise ValueError(f"placed {int(mask.sum())} audio tokens, expected {audio_frames}")
    return mask


def build_prompt(
    tokenizer, *, instruction_text: str | None, audio_frames: int | None, system: str | None = None
) -> dict[str, torch.Tensor]:
    """The generation prompt of one turn (what ``build_example`` puts before the response).

    Returns:
        ``input_ids`` [L], ``labels`` [L] (all ``IGNORE_INDEX``) and ``audio_positions`` [L] (bool).
    """
    messages = _messages(instruction_text, audio_frames, system)
    prompt = _expand_audio(tokenizer, _render(tokenizer, messages, add_generation_prompt=True), audio_frames)
    input_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "labels": torch.full_like(input_ids, IGNORE_INDEX),
        "audio_positions": _audio_mask(tokenizer, input_ids, audio_frames),
    }


def build_example(
    tokenizer,
    *,
    instruction_text: str | None,
    audio_frames: int | None,
    response: str,
    system: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize one (instruction, response) turn with the tokenizer's chat template.

    Args:
        tokenizer: A tokenizer with a chat template (Gemma 4's: audio tokens as named attributes).
        instruction_text: Text of the user turn (placed before the audio, as Gemma 4 prefers), or ``None``.
        audio_frames: Number of audio frames N of a spoken instruction, or ``None`` for text only.
        response: The model's answer.
        system: Optional system prompt.

    Returns:
        ``input_ids`` [L], ``labels`` [L] (``IGNORE_INDEX`` except the response tokens and the end-of-turn
        token) and ``audio_positions`` [L] (bool, True at the N audio soft-token slots).

    Raises:
        ValueError: With neither text nor audio, with ``audio_frames < 1``, or when the template does not
            render the prompt as a prefix of the full conversation.
    """
    messages = _messages(instruction_text, audio_frames, system)
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(
        tokenizer, [*messages, {"role": "assistant", "content": response}], add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the generation prompt as a prefix of the full turn"
        )
    answer = full[len(prompt) :]
    prompt = _expand_audio(tokenizer, prompt, audio_frames)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "prompt tokens are not a prefix of the full conversation's tokens (tokenizer merges across)"
        )

    input_ids = torch.tensor(full_ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    eot = end_of_turn_id(tokenizer)
    start = len(prompt_ids)
    tail = full_ids[start:]
    # Train through the first end-of-turn so the model learns to stop; what the template adds after it
    # (a newline) is never generated and stays out of the loss.
    stop = start + tail.index(eot) + 1 if eot in tail else len(full_ids)
    labels[start:stop] = input_ids[start:stop]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "audio_positions": _audio_mask(tokenizer, input_ids, audio_frames),
    }


def pack_examples(
    examples: Sequence[dict[str, torch.Tensor]], max_tokens: int, *, balance: bool = False
) -> list[dict[str, Any]]:
    """Pack examples into rows of at most ``max_tokens`` (first-fit decreasing), keeping each whole.

    Args:
        examples: Outputs of ``build_example`` (``input_ids`` [L_i], ``labels`` [L_i], ``audio_positions`` [L_i]).
        max_tokens: Row capacity.
        balance: Spread the examples over as few rows as first-fit decreasing needs, longest first to the
            shortest row (LPT) and then evened out by swaps, so the rows end level: a batch is as wide as
            its longest row, and first-fit rows are full but the last, which then pads the batch. Never
            more tokens than one example a row.

    Returns:
        One dict per row: ``input_ids``/``labels``/``audio_positions``/``position_ids`` [L_row] (positions
        restart at 0 per example), ``lengths`` (list of example lengths) and ``indices`` (which input examples,
        in row order: audio inputs of a row must be given in this order).

    Raises:
        ValueError: If an example is longer than ``max_tokens`` (never truncated silently).
    """
    lengths = [int(ex["input_ids"].numel()) for ex in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} example(s) exceed max_tokens={max_tokens} (first: #{too_long[0]}, "
            f"{lengths[too_long[0]]} tokens); filter or raise max_tokens"
        )
    rows = _first_fit(lengths, max_tokens)
    if balance:
        rows = _level_rows(lengths, max_tokens, len(rows))
        if len(rows) * max(sum(lengths[i] for i in r) for r in rows) > len(lengths) * max(lengths):
            rows = [[i] for i in sorted(range(len(lengths)), key=lambda j: -lengths[j])]  # never wider than padding
    packs = []
    for row in rows:
        packs.append({
            "input_ids": torch.cat([examples[i]["input_ids"] for i in row]),
            "labels": torch.cat([examples[i]["labels"] for i in row]),
            "audio_positions": torch.cat([examples[i]["audio_positions"] for i in row]),
            "position_ids": torch.cat([torch.arange(lengths[i]) for i in row]),
            "lengths": [lengths[i] for i in row],
            "indices": row,
        })  # fmt: skip
    return packs


def _first_fit(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: each example, longest first, into the first row it fits."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_tokens - lengths[i])
    return rows


def _level_rows(lengths: Sequence[int], max_tokens: int, fewest: int) -> list[list[int]]:
    """Longest first into the shortest of ``n`` rows, from ``n = ceil(total / max_tokens)`` up to ``fewest``
    (first-fit's count) until no row is over capacity; first-fit's own rows when none is."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    for n in range(max(1, -(-sum(lengths) // max_tokens)), fewest + 1):
        rows: list[list[int]] = [[] for _ in range(n)]
        load = [0] * n
        for i in order:
            r = min(range(n), key=lambda k: (load[k], k))
            rows[r].append(i)
            load[r] += lengths[i]
        if max(load) <= max_tokens:
            return _even_out(rows, load, lengths)
    return _first_fit(lengths, max_tokens)


def _even_out(rows: list[list[int]], load: list[int], lengths: Sequence[int]) -> list[list[int]]:
    """Swap (or move) examples between the longest and the shortest row while that shortens the longest."""
    for _ in range(4 * len(lengths)):
        hi = max(range(len(rows)), key=lambda k: load[k])
        lo = min(range(len(rows)), key=lambda k: load[k])
        gap, best = load[hi] - load[lo], None
        for a in rows[hi]:
            for b in [*rows[lo], None]:  # None: move ``a`` over
                d = lengths[a] - (lengths[b] if b is not None else 0)
                if 0 < d < gap and (best is None or abs(gap - 2 * d) < abs(gap - 2 * best[0])):
                    best = (d, a, b)
        if best is None:
            break
        d, a, b = best
        rows[hi].remove(a)
        rows[lo].append(a)
        if b is not None:
            rows[lo].remove(b)
            rows[hi].append(b)
        load[hi], load[lo] = load[hi] - d, load[lo] + d
    return rows


def collate_packed(packs: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch, right-padding each row with a block of its own.

    Returns:
        ``input_ids``/``labels``/``position_ids`` [B, L] (long), ``audio_positions`` [B, L] (bool); no
        ``attention_mask``: its absence is what lets transformers derive the block-diagonal mask.
    """
    width = max(int(p["input_ids"].numel()) for p in packs)
    out: dict[str, list[torch.Tensor]] = {
        "input_ids": [],
        "labels": [],
        "position_ids": [],
        "audio_positions": [],
    }
    for p in packs:
        n = width - int(p["input_ids"].numel())
        out["input_ids"].append(torch.cat([p["input_ids"], torch.full((n,), pad_id, dtype=torch.long)]))
        out["labels"].append(torch.cat([p["labels"], torch.full((n,), IGNORE_INDEX, dtype=torch.long)]))
        out["position_ids"].append(torch.cat([p["position_ids"], torch.arange(n)]))
        out["audio_positions"].append(torch.cat([p["audio_positions"], torch.zeros(n, dtype=torch.bool)]))
    return {k: torch.stack(v) for k, v in out.items()}


def collate_padded(
    examples: Sequence[dict[str, torch.Tensor]], *, pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad examples (one per row) to a batch with an ``attention_mask``: the unpacked alternative.

    Returns:
        ``input_ids``/``labels``/``attention_mask`` [B, L] (long) and ``audio_positions`` [B, L] (bool).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(int(e["input_ids"].numel()) for e in examples)
    out: dict[str, list[torch.Tensor]] = {
        "input_ids": [],
        "labels": [],
        "attention_mask": [],
        "audio_positions": [],
    }
    for e in examples:
        n = width - int(e["input_ids"].numel())
        pads = {
            "input_ids": torch.full((n,), pad_id, dtype=torch.long),
            "labels": torch.full((n,), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(n, dtype=torch.long),
            "audio_positions": torch.zeros(n, dtype=torch.bool),
        }
        values = {**{k: e[k] for k in ("input_ids", "labels", "audio_positions")},
                  "attention_mask": torch.ones_like(e["input_ids"])}  # fmt: skip
        for k, v in values.items():
            out[k].append(torch.cat([pads[k], v]) if side == "left" else torch.cat([v, pads[k]]))
    return {k: torch.stack(v) for k, v in out.items()}


def collate_instructions(
    examples: list[dict[str, Any]], *, pad_id: int, pack: bool = False, max_tokens_per_row: int = 512
) -> dict[str, torch.Tensor]:
    """``build_example`` outputs (+ ``codes`` [Q, T_i] for spoken ones) -> a batch, padded or packed.

    Args:
        examples: The batch's examples; a ``sample_weight`` of 0 (a padding batch of the streamed
            datamodule, which keeps DDP ranks in step) takes its tokens out of the loss.
        pad_id: Fill id of padded positions.
        pack: Several examples per row (``models.chat_format.pack_examples``, rows levelled):
            ``position_ids`` restart per example and there is no ``attention_mask``, so attention never
            crosses an example. Without it one example per row, right-padded, with an ``attention_mask``.
        max_tokens_per_row: Row capacity when packing (an example longer than it gets a row of its own).

    Returns:
        ``input_ids``/``labels``/``audio_positions`` [B, L] and ``attention_mask`` (padded) or
        ``position_ids`` (packed) [B, L]; ``real_tokens`` (non-pad tokens, a scalar) and
        ``sample_weight`` [n_examples]; with spoken rows also ``codes`` [N, Q, T] (padded with -1) and
        ``code_lengths`` [N], N = spoken examples in row-major order (the order their audio slots
        are filled in); with CTC targets ``ctc_targets`` [N, S] (padded with ``IGNORE_INDEX``); with
        text teachers (examples carrying ``teacher``, a text-only ``build_example`` output of the same
        response) ``teacher`` (their padded batch, in row-major order of the students) and
        ``teacher_tokens`` [n_labelled] (bool: which of the batch's labelled tokens, row-major, belong
        to an example with a teacher), see ``teacher_token_mask``.
    """
    examples = [_weighted(e) for e in examples]
    if pack:
        capacity = max(max_tokens_per_row, max(int(e["input_ids"].numel()) for e in examples))
        packs = pack_examples(examples, capacity, balance=True)
        batch = collate_packed(packs, pad_id=pad_id)
        order = [i for p in packs for i in p["indices"]]
    else:
        batch = collate_padded(examples, pad_id=pad_id)
        order = list(range(len(examples)))
    ordered = [examples[i] for i in order]
    batch["real_tokens"] = torch.tensor(sum(int(e["input_ids"].numel()) for e in examples))
    batch["sample_weight"] = torch.tensor([float(e.get("sample_weight", 1.0)) for e in examples])
    targets = [e["ctc_targets"] for e in ordered if "ctc_targets" in e]
    if targets:
        batch["ctc_targets"] = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
    spoken = [e["codes"] for e in ordered if "codes" in e]
    if spoken:
        q, t = spoken[0].shape[0], max(c.shape[-1] for c in spoken)
        codes = torch.full((len(spoken), q, t), -1, dtype=torch.long)
        for i, c in enumerate(spoken):
            codes[i, :, : c.shape[-1]] = c
        batch["codes"] = codes
        batch["code_lengths"] = torch.tensor([c.shape[-1] for c in spoken])
    teachers = [e["teacher"] for e in ordered if "teacher" in e]
    if teachers:
        batch["teacher"] = collate_padded(teachers, pad_id=pad_id)  # padded even when the students are packed
        batch["teacher_tokens"] = teacher_token_mask(ordered)
    return batch


def teacher_token_mask(ordered: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Which labelled tokens of a batch (its examples in row-major order) have a text teacher, ``[n]`` bool.

    A row's labelled tokens are its examples' labelled tokens in order (packed or padded), so selecting
    the student's labelled logits with this mask lines them up with the teacher batch's labelled logits,
    one example after the other.
    """
    flags = [torch.full((int((e["labels"] != IGNORE_INDEX).sum()),), "teacher" in e, dtype=torch.bool) for e in ordered]
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def _weighted(example: dict[str, Any]) -> dict[str, Any]:
    """``example`` with its labels ignored when its ``sample_weight`` is 0 (it then adds no loss)."""
    if float(example.get("sample_weight", 1.0)) > 0:
        return example
    muted = {k: v for k, v in example.items() if k != "teacher"}  # nothing to distil either
    return {**muted, "labels": torch.full_like(example["labels"], IGNORE_INDEX)}
