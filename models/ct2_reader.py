"""A reader for CTranslate2's ``model.bin``, without CTranslate2.

``model.bin`` layout (CTranslate2 ``python/ctranslate2/specs/model_spec.py``, ``ModelSpec._serialize``,
binary version 6; all integers little-endian):

- ``uint32`` binary version, string spec name (``WhisperSpec``), ``uint32`` spec revision (3);
- ``uint32`` variable count, then per variable: string name, ``uint8`` rank, ``rank x uint32`` shape,
  ``uint8`` dtype id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), ``uint32`` byte
  count, the raw row-major bytes;
- ``uint32`` alias count, then per alias: string alias, string target variable;

where a string is ``uint16`` length (including a trailing NUL), the UTF-8 bytes and the NUL. Scalars
(rank 0) carry layer options (``num_heads``, ``pre_norm``, ``activation``...); they are checked
against what Hugging Face's Whisper computes, never ignored.

Only the container is read here; what the variables mean for Whisper is
:mod:`models.whisper_ct2_weights`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["BINARY_VERSION", "DTYPES", "CT2FormatError", "CT2Model", "read_ct2_model"]

BINARY_VERSION = 6
# The DataType enum of CTranslate2's include/ctranslate2/types.h, in id order.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16}


class CT2FormatError(ValueError):
    """A CTranslate2 model this converter cannot map one to one onto Hugging Face's Whisper."""


@dataclass
class CT2Model:
    """The parsed content of a CTranslate2 ``model.bin``.

    Attributes:
        binary_version, spec, revision: the header.
        variables: name -> array (bfloat16 arrives as a float32 array; it widens exactly).
        dtypes: name -> the stored dtype name (``"float16"``...).
        aliases: alias name -> the variable it stands for.
    """

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) without CTranslate2.

    Args:
        path: the ``model.bin`` file or the folder holding it.

    Raises:
        CT2FormatError: another binary version, a truncated file, trailing bytes, a size that does
            not match the shape, an unknown dtype id, a duplicate name, or an alias to nothing.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    data = memoryview(path.read_bytes())
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(data):
            raise CT2FormatError(f"{path}: truncated at byte {pos} (wanted {n} more)")
        out = data[pos : pos + n]
        pos += n
        return out

    def uint(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        raw = bytes(take(uint("H")))
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"{path}: a string at byte {pos - len(raw)} lacks its NUL terminator")
        return raw[:-1].decode("utf-8")

    version = uint("I")
    if version != BINARY_VERSION:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version}; this reader knows version {BINARY_VERSION} "
            "(CTranslate2 >= 3); re-convert the model with a current ct2-transformers-converter"
        )
    spec, revision = string(), uint("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(uint("I")):
        name = string()
        shape = tuple(uint("I") for _ in range(uint("B")))
        type_id = uint("B")
        if type_id >= len(DTYPES):
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dtype = DTYPES[type_id]
        raw = take(uint("I"))
        itemsize = 2 if dtype == "bfloat16" else np.dtype(_NUMPY[dtype]).itemsize
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CT2FormatError(f"{path}: variable {name!r}: {len(raw)} bytes for shape {shape} {dtype}")
        if name in variables:
            raise CT2FormatError(f"{path}: variable {name!r} appears twice")
        if dtype == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32
            value = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            value = np.frombuffer(raw, np.dtype(_NUMPY[dtype]).newbyteorder("<"))
        variables[name], dtypes[name] = value.reshape(shape), dtype
    aliases: dict[str, str] = {}
    for _ in range(uint("I")):
        alias, target = string(), string()
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias!r} points to missing variable {target!r}")
        if alias in variables or alias in aliases:
            raise CT2FormatError(f"{path}: alias {alias!r} duplicates a name")
        aliases[alias] = target
    if pos != len(data):
        raise CT2FormatError(f"{path}: {len(data) - pos} unexpected bytes after the aliases")
    return CT2Model(version, spec, revision, variables, dtypes, aliases)
