"""Debug-size speech encoders: Gemma 4's audio tower, Whisper and HuBERT, as configs and saved folders.

Each ``*_debug_config()`` is the real architecture at a size that runs on a CPU in milliseconds;
:func:`save_gemma4_audio_debug` and :func:`save_whisper_debug` write random-weight folders that load
like the hub ids. Part of :mod:`demo.tiny`, which re-exports every name.
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
    GenerationConfig,
    HubertConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from demo.tiny_tokenizers import train_tokenizer

__all__ = [
    "GEMMA4_AUDIO_DIM",
    "GEMMA4_AUDIO_FRAME_RATE",
    "gemma4_audio_debug_config",
    "hubert_debug_config",
    "save_gemma4_audio_debug",
    "save_whisper_debug",
    "whisper_debug_config",
]

# The real encoder's pre-projection width and frame rate (default Gemma4AudioConfig; 16 kHz / 160 / 4).
GEMMA4_AUDIO_DIM = 1024
GEMMA4_AUDIO_FRAME_RATE = 25.0


def gemma4_audio_debug_config(**overrides: Any) -> Gemma4AudioConfig:
    """A 2-layer, 64-dim Gemma 4 audio encoder config (same 25 frames/s as the real one).

    ``subsampling_conv_channels[0]`` stays 128: the subsampler sizes its projection as
    ``channels[0] // 4 * channels[1]``, which only matches the 128-bin mel input when it is 128.

    Args:
        **overrides: any ``Gemma4AudioConfig`` field, applied last.

    Returns:
        The config; ``hidden_size`` is the encoder dim the stage-1 quantizer sees.
    """
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
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


def whisper_debug_config(**overrides: Any) -> WhisperConfig:
    """A 2-layer, 32-dim Whisper config with a 4 s window (``max_source_positions=200``).

    Whisper pads every input to its full window (``2 * max_source_positions`` mel frames at
    100 frames/s), so the small window keeps tests fast; the encoder still runs at 50 frames/s.

    Args:
        **overrides: any ``WhisperConfig`` field.

    Returns:
        The config (``num_mel_bins=80``, ``d_model=32``).
    """
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
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


def hubert_debug_config(**overrides: Any) -> HubertConfig:
    """A 3-layer, 32-dim HuBERT config with the Large model's layer norms (50 frames/s).

    ``feat_extract_norm="layer"`` with ``do_stable_layer_norm=True`` is HuBERT Large's layout, the
    one that takes an attention mask, so padded batches match unbatched items.

    Args:
        **overrides: any ``HubertConfig`` field.

    Returns:
        The config (``hidden_size=32``).
    """
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
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


def save_gemma4_audio_debug(path: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised tiny ``Gemma4AudioModel`` and its feature extractor to ``path``.

    The folder loads with ``Gemma4AudioEncoder(source=path)``, the same code a real run uses with a
    hub id, so the demo and tests exercise the real loading path without the hub.

    Args:
        path: output folder (created).
        seed: torch seed for the random weights; the same seed writes the same weights.
        **overrides: forwarded to :func:`gemma4_audio_debug_config`.

    Returns:
        The folder, as a ``Path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma4AudioModel(gemma4_audio_debug_config(**overrides))
    model.save_pretrained(path)
    Gemma4AudioFeatureExtractor().save_pretrained(path)
    return path


def save_whisper_debug(out_dir: str | Path, texts: list[str], *, seed: int = 0, **config: Any) -> Path:
    """Write a random-weight tiny Whisper folder (model, tokenizer, feature extractor) for tests.

    The tokenizer is a byte-level BPE trained on ``texts`` with Whisper's special tokens; the model
    (:func:`whisper_debug_config`, a 4 s window) has exactly its vocabulary. The
    folder loads as a ``WhisperEncoder(source=...)`` and a ``models.whisper_asr.WhisperASR`` alike.
    """
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    tok = train_tokenizer(texts, vocab_size=300, special_tokens=specials, chat_template=None)
    ids = tok.convert_tokens_to_ids
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: WhisperConfig = whisper_debug_config(
        vocab_size=len(tok), decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"), **config,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, no_timestamps_token_id=ids("<|notimestamps|>"), is_multilingual=False,
        suppress_tokens=[], begin_suppress_tokens=[cfg.eos_token_id],
    )
    model.save_pretrained(out)
    window_s = 2 * cfg.max_source_positions * 160 // 16000
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=window_s).save_pretrained(out)
    tok.save_pretrained(out)
    return out
