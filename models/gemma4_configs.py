"""Tiny and debug configs for the frozen speech encoders, so tests and the demo build real classes offline.

Follows torchtune's builder functions (``*_debug()``): each returns a transformers config of the real
architecture at a size that runs on a laptop CPU in milliseconds, with random weights. Nothing here
touches the hub; real runs name a hub id or a local folder instead (see ``models/encoders/``).

Reference figures for the real Gemma 4 audio encoder (the default ``Gemma4AudioConfig``, shipped in
``google/gemma-4-E2B-it`` and ``google/gemma-4-E4B-it``; the 26B-A4B and 31B checkpoints have no
audio tower): a 12-layer USM-style Conformer with ``hidden_size=1024``; 128-bin log-mel at 100 frames/s
(hop 10 ms) subsampled 4x by two stride-2 convolutions, so 25 frames/s (40 ms a frame). Its
``output_proj`` maps 1024 -> ``output_proj_dims=1536``; stage 1 quantizes the 1024-dim *input* of
that projection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma4AudioConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4AudioModel,
    Gemma4Config,
    Gemma4TextConfig,
    HubertConfig,
    WhisperConfig,
)

__all__ = [
    "GEMMA4_AUDIO_DIM",
    "GEMMA4_AUDIO_FRAME_RATE",
    "save_tiny_gemma4_audio",
    "tiny_gemma4_audio_config",
    "tiny_gemma4_config",
    "tiny_gemma4_text_config",
    "tiny_hubert_config",
    "tiny_whisper_config",
]

# The real encoder's pre-projection width and frame rate (default Gemma4AudioConfig; 16 kHz / 160 / 4).
GEMMA4_AUDIO_DIM = 1024
GEMMA4_AUDIO_FRAME_RATE = 25.0


def tiny_gemma4_audio_config(**overrides: Any) -> Gemma4AudioConfig:
    """A 2-layer, 64-dim Gemma 4 audio encoder config (same 25 frames/s as the real one).

    ``subsampling_conv_channels[0]`` stays 128: the subsampler sizes its projection as
    ``channels[0] // 4 * channels[1]``, which only matches the 128-bin mel input when it is 128.

    Args:
        **overrides: any ``Gemma4AudioConfig`` field, applied last.

    Returns:
        The config; ``hidden_size`` is the encoder dim the stage-1 quantizer sees.
    """
    kwargs: dict[str, Any] = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        subsampling_conv_channels=[128, 8],
        conv_kernel_size=3,
        attention_chunk_size=4,
        attention_context_left=5,
        attention_context_right=0,
        output_proj_dims=48,
    )
    kwargs.update(overrides)
    if list(kwargs["subsampling_conv_channels"])[0] != 128:
        raise ValueError("subsampling_conv_channels[0] must be 128 (it is tied to the 128 mel bins)")
    return Gemma4AudioConfig(**kwargs)


def tiny_gemma4_text_config(**overrides: Any) -> Gemma4TextConfig:
    """A 2-layer, 32-dim Gemma 4 text config (small vocabularies) for tiny full multimodal models.

    Args:
        **overrides: any ``Gemma4TextConfig`` field (``global_head_dim`` is accepted too).

    Returns:
        The text config.
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        vocab_size_per_layer_input=512,
        hidden_size_per_layer_input=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    return Gemma4TextConfig(**kwargs)


def tiny_gemma4_config(
    *, audio: dict[str, Any] | None = None, text: dict[str, Any] | None = None
) -> Gemma4Config:
    """A tiny full Gemma 4 config (text + audio towers, no vision), like ``google/gemma-4-E2B-it`` in shape.

    The special token ids are moved inside the tiny vocabulary so the embedding lookups stay valid.

    Args:
        audio: overrides for :func:`tiny_gemma4_audio_config`.
        text: overrides for :func:`tiny_gemma4_text_config`.

    Returns:
        A ``Gemma4Config`` for ``Gemma4ForConditionalGeneration``.
    """
    text_config = tiny_gemma4_text_config(**(text or {}))
    vocab = text_config.vocab_size
    return Gemma4Config(
        text_config=text_config,
        vision_config=None,
        audio_config=tiny_gemma4_audio_config(**(audio or {})),
        boi_token_id=vocab - 7,
        eoi_token_id=vocab - 6,
        image_token_id=vocab - 5,
        video_token_id=vocab - 4,
        boa_token_id=vocab - 3,
        eoa_token_index=vocab - 2,
        audio_token_id=vocab - 1,
    )


def tiny_whisper_config(**overrides: Any) -> WhisperConfig:
    """A 2-layer, 32-dim Whisper config with a 4 s window (``max_source_positions=200``).

    Whisper pads every input to its full window (``2 * max_source_positions`` mel frames at
    100 frames/s), so the small window keeps tests fast; the encoder still runs at 50 frames/s.

    Args:
        **overrides: any ``WhisperConfig`` field.

    Returns:
        The config (``num_mel_bins=80``, ``d_model=32``).
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=200,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def tiny_hubert_config(**overrides: Any) -> HubertConfig:
    """A 3-layer, 32-dim HuBERT config with the Large model's layer norms (50 frames/s).

    ``feat_extract_norm="layer"`` with ``do_stable_layer_norm=True`` is HuBERT Large's layout, the
    one that takes an attention mask, so padded batches match unbatched items.

    Args:
        **overrides: any ``HubertConfig`` field.

    Returns:
        The config (``hidden_size=32``).
    """
    kwargs: dict[str, Any] = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        vocab_size=32,
    )
    kwargs.update(overrides)
    return HubertConfig(**kwargs)


def save_tiny_gemma4_audio(path: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised tiny ``Gemma4AudioModel`` and its feature extractor to ``path``.

    The folder loads with ``Gemma4AudioEncoder(source=path)``, the same code a real run uses with a
    hub id, so the demo and tests exercise the real loading path without the hub.

    Args:
        path: output folder (created).
        seed: torch seed for the random weights; the same seed writes the same weights.
        **overrides: forwarded to :func:`tiny_gemma4_audio_config`.

    Returns:
        The folder, as a ``Path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4AudioModel(tiny_gemma4_audio_config(**overrides))
    model.save_pretrained(path)
    Gemma4AudioFeatureExtractor().save_pretrained(path)
    return path
