"""SpireLM's unit strings: consecutive duplicates collapsed, units as Unicode private-use characters.

SpireLM (Ambilduke et al., 2025) feeds HuBERT k-means units to a text LLM by collapsing runs of the
same unit and writing each unit as one private-use-area (PUA) character, so any text tokenizer
carries them without a vocabulary change: no real text uses those code points, and a byte-level
tokenizer (GPT-2, Whisper, Llama 3, Gemma) encodes and decodes them exactly.

The mapping is a function of the unit alone (it does not depend on ``K``): unit ``u`` is

- ``U+E000 + u`` for ``u < 6400`` (the Basic Multilingual Plane's PUA, ``U+E000..U+F8FF``: one UTF-16
  unit, three UTF-8 bytes);
- then the supplementary PUA-A (``U+F0000..U+FFFFD``, 65534 code points);
- then the supplementary PUA-B (``U+100000..U+10FFFD``, 65534 code points).

So ``K`` up to 6400 (SpireLM's 5000 included) stays in the BMP, and at most :data:`MAX_UNITS`
(137468) units can be written; a larger ``K`` is refused. ``U+FFFFE/F`` and ``U+10FFFE/F`` are
noncharacters and never used.

Deduplication is exactly invertible with the run lengths: ``expand(*collapse(u)) == u``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "BMP_PUA_SIZE",
    "MAX_UNITS",
    "check_unit_count",
    "collapse",
    "expand",
    "pua_to_units",
    "units_to_pua",
]

_BMP_START, BMP_PUA_SIZE = 0xE000, 6400  # U+E000..U+F8FF
_PLANE_SIZE = 65534  # U+X0000..U+XFFFD of planes 15 (PUA-A) and 16 (PUA-B)
_PLANES = (0xF0000, 0x100000)
MAX_UNITS = BMP_PUA_SIZE + len(_PLANES) * _PLANE_SIZE  # 137468


def check_unit_count(codebook_size: int) -> None:
    """Raise ``ValueError`` when ``codebook_size`` units cannot all be written as PUA characters."""
    if not 1 <= codebook_size <= MAX_UNITS:
        raise ValueError(
            f"{codebook_size} units cannot be written as private-use characters: at most {MAX_UNITS} "
            f"({BMP_PUA_SIZE} in the BMP, {_PLANE_SIZE} in each of the PUA-A and PUA-B planes)"
        )


def _ints(units: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(units, torch.Tensor):
        if units.dim() != 1:
            raise ValueError(f"units must be one-dimensional, got shape {tuple(units.shape)}")
        return units.tolist()
    return [int(u) for u in units]


def collapse(units: Sequence[int] | torch.Tensor) -> tuple[list[int], list[int]]:
    """Collapse runs of identical consecutive units.

    Args:
        units: ``[T]`` units (a list or a 1-D tensor).

    Returns:
        ``(values, lengths)``: one value per run and its run length (``sum(lengths) == T``).
    """
    values: list[int] = []
    lengths: list[int] = []
    for u in _ints(units):
        if values and values[-1] == u:
            lengths[-1] += 1
        else:
            values.append(u)
            lengths.append(1)
    return values, lengths


def expand(values: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Inverse of :func:`collapse`: each value repeated its run length."""
    if len(values) != len(lengths):
        raise ValueError(f"{len(values)} values but {len(lengths)} run lengths")
    if any(int(n) < 1 for n in lengths):
        raise ValueError("run lengths must be >= 1")
    return [int(v) for v, n in zip(values, lengths, strict=True) for _ in range(int(n))]


def _char(u: int) -> str:
    if u < 0:
        raise ValueError(f"unit {u} is negative (padding frames, -1, carry no unit)")
    if u < BMP_PUA_SIZE:
        return chr(_BMP_START + u)
    rest = u - BMP_PUA_SIZE
    plane, offset = divmod(rest, _PLANE_SIZE)
    if plane >= len(_PLANES):
        raise ValueError(f"unit {u} is beyond the private-use areas (at most {MAX_UNITS} units)")
    return chr(_PLANES[plane] + offset)


def _unit(ch: str, position: int) -> int:
    cp = ord(ch)
    if _BMP_START <= cp < _BMP_START + BMP_PUA_SIZE:
        return cp - _BMP_START
    for i, start in enumerate(_PLANES):
        if start <= cp < start + _PLANE_SIZE:
            return BMP_PUA_SIZE + i * _PLANE_SIZE + cp - start
    raise ValueError(f"character {position} (U+{cp:04X}) is not a private-use unit character")


def units_to_pua(units: Sequence[int] | torch.Tensor, *, dedup: bool = True) -> str:
    """Units as a string of private-use characters, one per unit (per run with ``dedup``).

    Args:
        units: ``[T]`` units in ``[0, MAX_UNITS)``.
        dedup: collapse consecutive duplicates first (SpireLM's form).

    Returns:
        The string; ``len == T`` without ``dedup``.

    Raises:
        ValueError: a negative unit or one beyond the private-use areas.
    """
    values = collapse(units)[0] if dedup else _ints(units)
    return "".join(_char(u) for u in values)


def pua_to_units(text: str) -> list[int]:
    """Inverse of :func:`units_to_pua` (without ``dedup``; with it, the collapsed units).

    Raises:
        ValueError: a character that is not a unit character, with its position.
    """
    return [_unit(ch, i) for i, ch in enumerate(text)]
