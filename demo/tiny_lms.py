"""Debug-size language models: Gemma 3 text LMs (stage 2, a text-only stage 3) and full Gemma 4s (stage 3).

:func:`save_gemma3_lm_debug` writes a random Gemma 3 with a tokenizer trained on the given text;
:func:`save_gemma4_llm_debug` a random ``Gemma4ForConditionalGeneration`` (audio + text, no vision);
:func:`save_gemma4_stage3_debug` the demo's stage-3 Gemma 4 whose audio tower is the stage-1 encoder.
Part of :mod:`demo.tiny`, which re-exports every name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4AudioModel,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
)

from demo.tiny_encoders import gemma4_audio_debug_config
from demo.tiny_tokenizers import GEMMA4_SPECIAL_TOKENS, gemma4_tokenizer_debug, train_tokenizer

__all__ = [
    "REAL_MODEL_ID",
    "gemma3_lm_debug_config",
    "gemma4_debug_config",
    "gemma4_llm_debug_config",
    "gemma4_text_debug_config",
    "save_gemma3_lm_debug",
    "save_gemma4_llm_debug",
    "save_gemma4_stage3_debug",
]

# The audio-capable instruction-tuned Gemma 4 the real stage-3 run fine-tunes (E2B is the smaller sibling).
REAL_MODEL_ID = "google/gemma-4-E4B-it"


def gemma4_text_debug_config(**overrides: Any) -> Gemma4TextConfig:
    """A 2-layer, 32-dim Gemma 4 text config (small vocabularies) for tiny full multimodal models.

    Args:
        **overrides: any ``Gemma4TextConfig`` field (``global_head_dim`` is accepted too).

    Returns:
        The text config.
    """
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
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


def gemma4_debug_config(
    *, audio: dict[str, Any] | None = None, text: dict[str, Any] | None = None
) -> Gemma4Config:
    """A tiny full Gemma 4 config (text + audio towers, no vision), like ``google/gemma-4-E2B-it`` in shape.

    The special token ids are moved inside the tiny vocabulary so the embedding lookups stay valid.

    Args:
        audio: overrides for :func:`gemma4_audio_debug_config`.
        text: overrides for :func:`gemma4_text_debug_config`.

    Returns:
        A ``Gemma4Config`` for ``Gemma4ForConditionalGeneration``.
    """
    text_config = gemma4_text_debug_config(**(text or {}))
    vocab = text_config.vocab_size
    return Gemma4Config(
        text_config=text_config,
        vision_config=None,
        audio_config=gemma4_audio_debug_config(**(audio or {})),
        boi_token_id=vocab - 7,
        eoi_token_id=vocab - 6,
        image_token_id=vocab - 5,
        video_token_id=vocab - 4,
        boa_token_id=vocab - 3,
        eoa_token_index=vocab - 2,
        audio_token_id=vocab - 1,
    )


def gemma4_llm_debug_config(*, vocab_size: int, hidden_size: int = 64, num_layers: int = 2) -> Gemma4Config:
    """A Gemma 4 config of a few layers and dims of 8 to 64, with the audio tower on and vision off.

    Args:
        vocab_size: Text vocabulary size; must cover the tokenizer (``len(tokenizer)``).
        hidden_size: Text hidden size.
        num_layers: Text decoder layers (the last one uses full attention, the others sliding).

    Returns:
        A ``Gemma4Config`` whose special-token ids match ``gemma4_tokenizer_debug``.
    """
    ids = {tok: i for i, tok in enumerate(GEMMA4_SPECIAL_TOKENS)}
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
    text_config = {
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 16,
        "hidden_size_per_layer_input": 8,
        "layer_types": ["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        "sliding_window": 32,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        "pad_token_id": ids["<pad>"],
        "eos_token_id": [ids["<eos>"], ids["<turn|>"]],
        "bos_token_id": ids["<bos>"],
        "initializer_range": 0.2,
    }
    audio_config = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        # The first subsampling conv must keep 128 channels (the checkpoint layout assumes it).
        "subsampling_conv_channels": [128, 8],
        "output_proj_dims": 48,
        "conv_kernel_size": 5,
    }
    return Gemma4Config(
        text_config=text_config,
        audio_config=audio_config,
        vision_config=None,
        boi_token_id=ids["<|image>"],
        eoi_token_id=ids["<image|>"],
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        boa_token_id=ids["<|audio>"],
        eoa_token_index=ids["<audio|>"],
        audio_token_id=ids["<|audio|>"],
        tie_word_embeddings=True,
        # Wider than the real 0.02: with a 64-dim tied embedding, 0.02 keeps every logit near 0, so a few
        # LoRA steps could not move the loss and the tiny model could not show that training works.
        initializer_range=0.2,
    )


def save_gemma4_llm_debug(path: str | Path, *, seed: int = 0, texts: Iterable[str] | None = None) -> Path:
    """Save a random-weight tiny ``Gemma4ForConditionalGeneration`` with its tokenizer and feature extractor.

    Args:
        path: Output folder (created).
        seed: Torch seed for the random weights.
        texts: Tokenizer training text (see ``gemma4_tokenizer_debug``).

    Returns:
        The folder, loadable with ``Gemma4ForConditionalGeneration.from_pretrained`` /
        ``AutoTokenizer.from_pretrained`` / ``AutoFeatureExtractor.from_pretrained``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma4_tokenizer_debug(texts=texts)
    config = gemma4_llm_debug_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Gemma4AudioFeatureExtractor().save_pretrained(path)
    (path / "tiny_gemma4.json").write_text(json.dumps({"seed": seed, "stands_in_for": REAL_MODEL_ID}) + "\n")
    return path


def gemma3_lm_debug_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, **overrides: Any):
    """A few-layer Gemma 3 text config with random weights, for tests and the demo.

    Args:
        vocab_size: Size of the tokenizer it will serve (before sound tokens are added).
        hidden_size: ``H``.
        num_layers: One sliding-window and one global layer by default, as in Gemma 3.
        **overrides: Any other ``Gemma3TextConfig`` field.
    """
    layer_types = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["full_attention"] * (
        num_layers % 2
    )
    # A config literal, written out on purpose: alike only in shape to the other builders' literals.
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        sliding_window=64,
        layer_types=layer_types,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def save_gemma3_lm_debug(out_dir: str | Path, texts: list[str], *, vocab_size: int = 400, hidden_size: int = 64,
                         num_layers: int = 2, seed: int = 0) -> Path:
    """Write a random-weight tiny Gemma 3 LM and a BPE tokenizer trained on ``texts`` (demo, tests).

    The folder loads like a hub id: ``SpeechLM(lm=out_dir, tokenizer=out_dir, ...)``.
    """
    out = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(gemma3_lm_debug_config(len(tok), hidden_size=hidden_size, num_layers=num_layers))
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    lm.save_pretrained(out)
    return out


def save_gemma4_stage3_debug(path: str | Path, *, encoder_dir: str | Path, seed: int = 0, texts: list[str] | None = None) -> Path:
    """A tiny random Gemma 4 whose audio tower *is* the stage-1 demo encoder (config and weights).

    The stage-1 RVQ was trained on that encoder's pre-projection states, so real speech through this
    model's audio tower lands where the RVQ's codes decode to.

    Args:
        path: Output folder.
        encoder_dir: The stage-1 encoder folder (a saved ``Gemma4AudioModel``).
        seed: Seed of the random text weights.
        texts: Tokenizer training text.

    Returns:
        The folder (model, tokenizer, feature extractor).
    """
    path = save_gemma4_llm_debug(path, seed=seed, texts=texts)
    encoder = Gemma4AudioModel.from_pretrained(str(encoder_dir))
    model = Gemma4ForConditionalGeneration.from_pretrained(str(path))
    config = model.config
    config.audio_config = encoder.config
    torch.manual_seed(seed)
    rebuilt = Gemma4ForConditionalGeneration(config).eval()
    missing, unexpected = rebuilt.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".audio_tower." not in k and "embed_audio" not in k},
        strict=False,
    )
    if unexpected or [k for k in missing if ".audio_tower." not in k and "embed_audio" not in k]:
        raise RuntimeError(f"text weights did not carry over: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rebuilt.model.audio_tower.load_state_dict(encoder.state_dict())
    rebuilt.generation_config = model.generation_config
    rebuilt.save_pretrained(path)
    return path
