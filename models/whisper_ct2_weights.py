"""CTranslate2 Whisper variables -> ``WhisperForConditionalGeneration`` parameters, one to one.

The variables follow the inverse of CTranslate2's ``WhisperLoader`` (``converters/transformers.py``):
self-attention q/k/v are fused into one ``linear_0`` (``[3D, D]``), cross-attention k/v into
``linear_1`` (``[2D, D]``), and the missing k bias (Whisper's ``k_proj`` has none) is stored as
zeros, which the converter checks. A tied output projection is an alias of the token embeddings.

The conversion is strict: every CTranslate2 variable and alias is used exactly once, every Hugging
Face parameter is filled, and shapes agree; anything else raises :class:`CT2FormatError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .ct2_reader import CT2FormatError, CT2Model

__all__ = ["SPEC_NAME", "SPEC_REVISION", "ct2_to_hf_state_dict"]

SPEC_NAME = "WhisperSpec"
SPEC_REVISION = 3
GELU = 3  # common_spec.Activation.GELU: Whisper's exact (erf) GELU
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

    def self_attention(hf: str, ct: str) -> None:
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")

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
        self_attention(hf, ct)
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
        self_attention(hf, ct)
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
