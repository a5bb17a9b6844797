"""Semantic-token codecs: RVQ codes <-> Ichigo-style token strings, with run-length compression.

Follows the token format of Ichigo / Speechless (Homebrew, arXiv:2410.15316, arXiv:2505.17417):
one level of codes is written as ``<|sound_start|><|sound_0123|>...<|sound_end|>`` with 4-digit
zero-padded ids. Stage 2's compressed form replaces a run of ``n >= 2`` identical codes by a
duration token *followed by* the code, ``<|duration_05|><|sound_0123|>``, exactly as Ichigo's
``convert_ids_to_tokens`` does (the duration prefixes the token it repeats). Unlike Ichigo, runs
longer than ``max_duration`` are split (``<|duration_49|><|sound_0007|><|sound_0007|>`` for 50),
so no out-of-vocabulary ``<|duration_50|>`` is ever written; decompression restores the exact
sequence.

Multi-level extension (all ``Q`` RVQ levels, used by the JSONL export): one block per level,
concatenated in level order. Level 0 is the plain Ichigo string, byte for byte, so Ichigo tooling
that reads the first block keeps working; level ``q >= 1`` is wrapped in
``<|sound_start_lq|>...<|sound_end_lq|>`` and its codes are written ``<|sound_lq_0123|>`` so a
regex for level-0 tokens never matches them. Duration tokens are shared by all levels and each
level is compressed independently::

    <|sound_start|><|duration_03|><|sound_0012|><|sound_0040|><|sound_end|>
    <|sound_start_l1|><|sound_l1_0007|>...<|sound_end_l1|>  ...  <|sound_start_l7|>...<|sound_end_l7|>

(without the line breaks). Every level must decode to the same number of frames.

Frame-interleaved form (what stage 3 writes into a text-only LLM's prompt, ``frames_to_string``):
one ``<|sound_start|>...<|sound_end|>`` block in which each frame writes its first ``L`` levels in
level order, ``<|sound_0012|><|sound_l1_0007|>...<|sound_l{L-1}_0003|>``, so the tokens of one
instant stay together (a causal LM reads each frame whole before the next). With ``L = 1`` it is
Ichigo's string byte for byte. Compression collapses a run of ``n >= min_duration`` identical
frames (all ``L`` codes equal) into ``<|duration_nn|>`` followed by that frame's ``L`` tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "SOUND_START",
    "SOUND_END",
    "codes_to_string",
    "string_to_codes",
    "levels_to_string",
    "string_to_levels",
    "run_lengths",
    "sound_token",
    "duration_token",
    "sound_token_names",
    "frames_to_string",
    "string_to_frames",
    "frame_token_names",
]

SOUND_START = "<|sound_start|>"
SOUND_END = "<|sound_end|>"
_TOKEN_RE = re.compile(r"<\|([^|<>]*)\|>")


def sound_token(code: int, level: int = 0) -> str:
    """The token for one code: ``<|sound_0123|>`` (level 0) or ``<|sound_l3_0123|>``."""
    return f"<|sound_{code:04d}|>" if level == 0 else f"<|sound_l{level}_{code:04d}|>"


def duration_token(n: int) -> str:
    """The token for a run of ``n`` frames: ``<|duration_05|>``."""
    return f"<|duration_{n:02d}|>"


def _start_end(level: int) -> tuple[str, str]:
    if level == 0:
        return SOUND_START, SOUND_END
    return f"<|sound_start_l{level}|>", f"<|sound_end_l{level}|>"


def _as_int_list(codes: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D code sequence, got shape {tuple(arr.shape)}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 9999):
        raise ValueError("codes must be integers in [0, 9999] (4-digit token ids)")
    return [int(c) for c in arr]


def run_lengths(
    codes: Sequence[int] | np.ndarray | torch.Tensor, *, max_duration: int = 49
) -> list[tuple[int, int]]:
    """Run-length encode codes into ``(code, n)`` pairs with ``1 <= n <= max_duration``.

    A run longer than ``max_duration`` is split into full chunks plus a remainder (which may be 1),
    so every ``n`` has a duration token (or needs none when ``n == 1``).

    Args:
        codes: ``[T]`` integer codes.
        max_duration: The largest duration token in the vocabulary.

    Returns:
        The runs in order; ``sum(n) == T``.
    """
    if max_duration < 2:
        raise ValueError(f"max_duration must be >= 2, got {max_duration}")
    out: list[tuple[int, int]] = []
    seq = _as_int_list(codes)
    i = 0
    while i < len(seq):
        j = i
        while j < len(seq) and seq[j] == seq[i]:
            j += 1
        n = j - i
        while n > 0:
            chunk = min(n, max_duration)
            out.append((seq[i], chunk))
            n -= chunk
        i = j
    return out


def _level_body(codes: list[int], level: int, compress: bool, max_duration: int, min_duration: int) -> str:
    parts: list[str] = []
    if not compress:
        return "".join(sound_token(c, level) for c in codes)
    for code, n in run_lengths(codes, max_duration=max_duration):
        if n >= min_duration:
            parts.append(duration_token(n) + sound_token(code, level))
        else:  # a short run stays spelled out; min_duration=2 means only singletons do
            parts.append(sound_token(code, level) * n)
    return "".join(parts)


def codes_to_string(
    codes_1d: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    compress: bool = False,
    max_duration: int = 49,
    min_duration: int = 2,
) -> str:
    """Write one level of codes as an Ichigo token string.

    Args:
        codes_1d: ``[T]`` integer codes in ``[0, 9999]``.
        compress: Run-length compress with ``<|duration_nn|>`` tokens.
        max_duration: Longest run one duration token may express; longer runs are split.
        min_duration: Shortest run written with a duration token (shorter runs are spelled out).

    Returns:
        ``"<|sound_start|>...<|sound_end|>"``.
    """
    if not 2 <= min_duration <= max_duration:
        raise ValueError(f"need 2 <= min_duration <= max_duration, got {min_duration}, {max_duration}")
    body = _level_body(_as_int_list(codes_1d), 0, compress, max_duration, min_duration)
    return SOUND_START + body + SOUND_END


def _parse_level(tokens: list[str], level: int, where: str) -> list[int]:
    prefix = "sound_" if level == 0 else f"sound_l{level}_"
    codes: list[int] = []
    pending = 0
    for tok in tokens:
        if tok.startswith("duration_") and tok[9:].isdigit():
            if pending:
                raise ValueError(f"{where}: two duration tokens in a row")
            pending = int(tok[9:])
            if pending < 1:
                raise ValueError(f"{where}: invalid duration token <|{tok}|>")
        elif tok.startswith(prefix) and tok[len(prefix) :].isdigit():
            codes.extend([int(tok[len(prefix) :])] * (pending or 1))
            pending = 0
        else:
            raise ValueError(f"{where}: unexpected token <|{tok}|> in level {level}")
    if pending:
        raise ValueError(f"{where}: duration token not followed by a sound token")
    return codes


def _split_blocks(s: str) -> list[tuple[str, list[str]]]:
    """Split a token string into ``(start_token, inner_tokens)`` blocks, rejecting stray text."""
    stripped = _TOKEN_RE.sub("", s)
    if stripped.strip():
        raise ValueError(f"unexpected text outside sound tokens: {stripped.strip()[:40]!r}")
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for tok in _TOKEN_RE.findall(s):
        if tok.startswith("sound_start"):
            if current is not None:
                raise ValueError(f"<|{tok}|> inside an open block")
            current = []
            blocks.append((tok, current))
        elif tok.startswith("sound_end"):
            if current is None or tok != blocks[-1][0].replace("start", "end"):
                raise ValueError(f"unmatched <|{tok}|>")
            current = None
        elif current is None:
            raise ValueError(f"token <|{tok}|> outside a sound block")
        else:
            current.append(tok)
    if current is not None:
        raise ValueError("missing end token")
    return blocks


def string_to_codes(s: str) -> np.ndarray:
    """Parse one Ichigo token string (compressed or not) back to codes.

    Args:
        s: ``"<|sound_start|>...<|sound_end|>"``.

    Returns:
        ``[T]`` int64 codes.

    Raises:
        ValueError: On malformed input (missing delimiters, unknown tokens, dangling durations).
    """
    blocks = _split_blocks(s)
    if len(blocks) != 1 or blocks[0][0] != "sound_start":
        raise ValueError(f"expected exactly one {SOUND_START}...{SOUND_END} block, got {len(blocks)}")
    return np.asarray(_parse_level(blocks[0][1], 0, "string_to_codes"), dtype=np.int64)


def levels_to_string(
    codes: np.ndarray | torch.Tensor, *, compress: bool = False, max_duration: int = 49, min_duration: int = 2
) -> str:
    """Write all RVQ levels ``[Q, T]`` as the multi-level string described in the module docstring."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"expected codes [Q, T], got shape {tuple(arr.shape)}")
    if not 2 <= min_duration <= max_duration:
        raise ValueError(f"need 2 <= min_duration <= max_duration, got {min_duration}, {max_duration}")
    out = []
    for q, row in enumerate(arr):
        start, end = _start_end(q)
        out.append(start + _level_body(_as_int_list(row), q, compress, max_duration, min_duration) + end)
    return "".join(out)


def string_to_levels(s: str) -> np.ndarray:
    """Parse a multi-level string back to int64 codes ``[Q, T]``.

    Raises:
        ValueError: If blocks are out of order or levels decode to different lengths.
    """
    levels = []
    for q, (start, tokens) in enumerate(_split_blocks(s)):
        expected = _start_end(q)[0][2:-2]
        if start != expected:
            raise ValueError(f"block {q} starts with <|{start}|>, expected <|{expected}|>")
        levels.append(_parse_level(tokens, q, f"level {q}"))
    if not levels:
        raise ValueError("no sound blocks found")
    lengths = {len(x) for x in levels}
    if len(lengths) != 1:
        raise ValueError(f"levels decode to different lengths: {[len(x) for x in levels]}")
    return np.asarray(levels, dtype=np.int64).reshape(len(levels), lengths.pop())


def sound_token_names(
    codebook_size: int, *, with_durations: bool = True, max_duration: int = 49, num_levels: int = 1
) -> list[str]:
    """The special tokens a text tokenizer needs to carry these strings.

    Args:
        codebook_size: ``K``; tokens ``<|sound_0000|>`` .. ``<|sound_{K-1:04d}|>``.
        with_durations: Add ``<|duration_02|>`` .. ``<|duration_{max_duration}|>``.
        max_duration: Largest duration token.
        num_levels: Also add the level-tagged tokens of levels ``1..num_levels-1``.

    Returns:
        Start/end tokens, then sound tokens, then duration tokens, in a fixed order.
    """
    if not 1 <= codebook_size <= 10000:
        raise ValueError(f"codebook_size must be in [1, 10000], got {codebook_size}")
    names: list[str] = []
    for q in range(num_levels):
        names.extend(_start_end(q))
        names.extend(sound_token(c, q) for c in range(codebook_size))
    if with_durations:
        names.extend(duration_token(n) for n in range(2, max_duration + 1))
    return names


def _frame_arrays(codes: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"expected codes [L, T] (or [T]), got shape {tuple(arr.shape)}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 9999):
        raise ValueError("codes must be integers in [0, 9999] (4-digit token ids)")
    return arr.astype(np.int64)


def frames_to_string(
    codes: np.ndarray | torch.Tensor, *, compress: bool = False, max_duration: int = 49, min_duration: int = 2
) -> str:
    """Write codes ``[L, T]`` frame by frame, levels interleaved (see the module docstring).

    Args:
        codes: ``[L, T]`` (or ``[T]`` for one level) integer codes in ``[0, 9999]``.
        compress: Collapse runs of identical frames with ``<|duration_nn|>`` tokens.
        max_duration: Longest run one duration token may express; longer runs are split.
        min_duration: Shortest run written with a duration token.

    Returns:
        ``"<|sound_start|>...<|sound_end|>"``; for ``L = 1`` equal to :func:`codes_to_string`.
    """
    if not 2 <= min_duration <= max_duration:
        raise ValueError(f"need 2 <= min_duration <= max_duration, got {min_duration}, {max_duration}")
    arr = _frame_arrays(codes)
    words = ["".join(sound_token(int(c), q) for q, c in enumerate(frame)) for frame in arr.T]
    parts: list[str] = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and words[j] == words[i] and (j - i) < (max_duration if compress else 1):
            j += 1
        n = j - i
        parts.append(duration_token(n) + words[i] if n >= min_duration else words[i] * n)
        i = j
    return SOUND_START + "".join(parts) + SOUND_END


def string_to_frames(s: str, *, num_levels: int) -> np.ndarray:
    """Parse :func:`frames_to_string` output back to int64 codes ``[num_levels, T]``.

    Raises:
        ValueError: On a malformed block, a level out of order or a frame cut short.
    """
    blocks = _split_blocks(s)
    if len(blocks) != 1 or blocks[0][0] != "sound_start":
        raise ValueError(f"expected exactly one {SOUND_START}...{SOUND_END} block, got {len(blocks)}")
    frames: list[list[int]] = []
    repeat, frame = 1, []
    for tok in blocks[0][1]:
        if tok.startswith("duration_") and tok[9:].isdigit():
            if frame or repeat != 1:
                raise ValueError(f"<|{tok}|> inside a frame or after another duration")
            repeat = int(tok[9:])
            continue
        level = len(frame)
        frame.append(_parse_level([tok], level, f"frame {len(frames)}")[0])
        if len(frame) == num_levels:
            frames += [frame] * repeat
            repeat, frame = 1, []
    if frame or repeat != 1:
        raise ValueError(f"the last frame has {len(frame)} of {num_levels} levels")
    return np.asarray(frames, dtype=np.int64).reshape(-1, num_levels).T.copy()


def frame_token_names(
    codebook_size: int, *, num_levels: int = 1, with_durations: bool = False, max_duration: int = 49
) -> list[str]:
    """The tokens :func:`frames_to_string` writes: start/end, ``num_levels x K`` sound tokens, durations.

    Level ``q >= 1`` contributes only its sound tokens (no block delimiters: one block holds all levels).
    """
    if not 1 <= codebook_size <= 10000:
        raise ValueError(f"codebook_size must be in [1, 10000], got {codebook_size}")
    names = [SOUND_START, SOUND_END]
    for q in range(num_levels):
        names.extend(sound_token(c, q) for c in range(codebook_size))
    if with_durations:
        names.extend(duration_token(n) for n in range(2, max_duration + 1))
    return names
