"""Frozen speech encoders behind one interface (stage-1 input); see ``base.FrozenEncoder``.

``Gemma4AudioEncoder`` (the Speechless default), ``WhisperEncoder`` (Ichigo), ``SSLEncoder``
(HuBERT / wav2vec2, SpireLM) and the weight-free ``LogMelEncoder`` all map 16 kHz audio ``[B, N]`` to
an :class:`EncoderOutput` (``states [B, T, D]``, ``lengths [B]``, ``mask [B, T]``).
"""

from typing import Any

from .base import EncoderOutput, FrozenEncoder, lengths_to_mask
from .gemma4 import Gemma4AudioEncoder, load_gemma4_audio_tower
from .logmel import LogMelEncoder
from .ssl import SSLEncoder
from .whisper import WhisperEncoder

__all__ = [
    "ENCODERS",
    "EncoderOutput",
    "FrozenEncoder",
    "Gemma4AudioEncoder",
    "LogMelEncoder",
    "SSLEncoder",
    "WhisperEncoder",
    "build_encoder",
    "lengths_to_mask",
    "load_gemma4_audio_tower",
]

ENCODERS: dict[str, type[FrozenEncoder]] = {
    "gemma4_audio": Gemma4AudioEncoder,
    "whisper": WhisperEncoder,
    "ssl": SSLEncoder,
    "hubert": SSLEncoder,
    "wav2vec2": SSLEncoder,
    "logmel": LogMelEncoder,
}


def build_encoder(kind: str, **kwargs: Any) -> FrozenEncoder:
    """Build an encoder by name (``describe()["kind"]`` names round-trip here).

    Args:
        kind: one of ``ENCODERS``.
        **kwargs: the class's keyword arguments.

    Returns:
        The frozen encoder.
    """
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; choose from {sorted(ENCODERS)}")
    return ENCODERS[kind](**kwargs)
