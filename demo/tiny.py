"""Debug-size models for the demo and the tests: every tiny builder in one place (torchtune's ``*_debug()``).

Each ``*_debug_config()`` returns a transformers config of the real architecture at a size that runs on a
laptop CPU in milliseconds; each ``save_*_debug()`` writes a random-weight folder (model, tokenizer,
feature extractor) that ``from_pretrained(path)`` loads exactly like the hub id, so tests, the demo and
real runs share one code path (``../shared/DESIGN.md``: no hub at test time). Nothing here touches the hub.

- speech encoders: :func:`gemma4_audio_debug_config` (and :func:`save_gemma4_audio_debug`),
  :func:`whisper_debug_config` (and :func:`save_whisper_debug`, a tiny Whisper with a trained tokenizer),
  :func:`hubert_debug_config`;
- tokenizers standing in for Gemma's offline: :func:`train_tokenizer` (byte-level BPE, Gemma's turn
  format) and :func:`gemma4_tokenizer_debug` (Gemma 4's special-token strings);
- language models: :func:`gemma3_lm_debug_config` / :func:`save_gemma3_lm_debug` (stage 2, and a
  text-only stage-3 LM), :func:`gemma4_debug_config` / :func:`gemma4_llm_debug_config` /
  :func:`save_gemma4_llm_debug` (a full Gemma 4, audio + text), :func:`save_gemma4_stage3_debug` (the
  demo's stage-3 Gemma 4 whose audio tower is the stage-1 encoder);
- :func:`save_demo_models`: the whole demo set under one folder, also the command
  ``python -m demo.tiny --out DIR --encoder gemma4-tiny --texts FILE`` (what ``speechless-init --tiny``
  prints first).

Reference figures for the real Gemma 4 audio encoder (the default ``Gemma4AudioConfig``, shipped in
``google/gemma-4-E2B-it`` and ``google/gemma-4-E4B-it``; the 26B-A4B and 31B checkpoints have no
audio tower): a 12-layer USM-style Conformer with ``hidden_size=1024``; 128-bin log-mel at 100 frames/s
(hop 10 ms) subsampled 4x by two stride-2 convolutions, so 25 frames/s (40 ms a frame). Its
``output_proj`` maps 1024 -> ``output_proj_dims=1536``; stage 1 quantizes the 1024-dim *input* of
that projection. The tiny Gemma 4 follows the layout of the audio-capable checkpoints: a
``Gemma4ForConditionalGeneration`` whose audio tower's ``output_proj`` feeds ``embed_audio``, and a
tokenizer whose special tokens carry the real strings (``<|turn>``/``<turn|>``, ``<|audio>``
``<|audio|>`` ``<audio|>``); only the ids differ. The full ``Gemma4Processor`` also needs image and video
processors (the video one needs torchvision), so only the audio feature extractor is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as bpe_models
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    Gemma4AudioConfig,
    Gemma4AudioFeatureExtractor,
    Gemma4AudioModel,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    GenerationConfig,
    HubertConfig,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

__all__ = [
    "BASE_SPECIAL_TOKENS",
    "GEMMA4_AUDIO_DIM",
    "GEMMA4_AUDIO_FRAME_RATE",
    "GEMMA4_CHAT_TEMPLATE",
    "GEMMA4_SPECIAL_TOKENS",
    "GEMMA_CHAT_TEMPLATE",
    "REAL_MODEL_ID",
    "gemma3_lm_debug_config",
    "gemma4_audio_debug_config",
    "gemma4_debug_config",
    "gemma4_llm_debug_config",
    "gemma4_text_debug_config",
    "gemma4_tokenizer_debug",
    "hubert_debug_config",
    "main",
    "save_demo_models",
    "save_gemma3_lm_debug",
    "save_gemma4_audio_debug",
    "save_gemma4_llm_debug",
    "save_gemma4_stage3_debug",
    "save_whisper_debug",
    "train_tokenizer",
    "whisper_debug_config",
]


# ---- speech encoders --------------------------------------------------------------------------

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


def gemma4_text_debug_config(**overrides: Any) -> Gemma4TextConfig:
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


def whisper_debug_config(**overrides: Any) -> WhisperConfig:
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


def hubert_debug_config(**overrides: Any) -> HubertConfig:
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

# ---- Gemma 4 (audio + text) ------------------------------------------------------------------

# The audio-capable instruction-tuned Gemma 4 the real stage-3 run fine-tunes (E2B is the smaller sibling).
REAL_MODEL_ID = "google/gemma-4-E4B-it"

# Gemma 4's special-token strings, in the order they get ids 0.. in the tiny vocabulary.
GEMMA4_SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|audio>", "<audio|>", "<|audio|>",
    "<|image>", "<image|>", "<|image|>", "<|video|>",
]  # fmt: skip

# Attribute names the Gemma 4 tokenizer exposes (tokenizer.audio_token, tokenizer.boa_token, ...).
_GEMMA4_NAMED_TOKENS = {
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
}

# A reduced Gemma 4 chat template: same turn markup and the same single ``<|audio|>`` placeholder per
# audio item that Gemma4Processor later expands to ``<|audio>`` + N x ``<|audio|>`` + ``<audio|>``.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<|audio|>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)

_DEFAULT_TEXTS = [
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of Ghana? The capital of Ghana is Accra.",
    "Transcribe the audio. Translate the sentence into English.",
    "one two three four five six seven eight nine zero",
    "Me din de Kofi. Wo ho te sen? Me ho ye. Medaase.",
]


def gemma4_tokenizer_debug(
    *, texts: Iterable[str] | None = None, vocab_size: int = 384, extra_tokens: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer with Gemma 4's special tokens at ids ``0..len(GEMMA4_SPECIAL_TOKENS)-1``.

    Args:
        texts: Training text; a few built-in sentences when ``None``.
        vocab_size: Target vocabulary size (special tokens and the ASCII alphabet included).
        extra_tokens: Further special tokens (e.g. sound tokens) appended after the trained vocabulary.

    Returns:
        A ``PreTrainedTokenizerFast`` with the chat template and Gemma 4's named special tokens.
    """
    texts = list(texts) if texts is not None else list(_DEFAULT_TEXTS)
    tok = Tokenizer(bpe_models.BPE(unk_token="<unk>"))
    # Gemma's SentencePiece model adds no dummy prefix: "▁" marks only spaces inside the text.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=GEMMA4_SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra = [t for t in extra_tokens if t not in GEMMA4_SPECIAL_TOKENS]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=dict(_GEMMA4_NAMED_TOKENS),
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video|>", *extra]})
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE
    for name, token in _GEMMA4_NAMED_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) != GEMMA4_SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"tiny tokenizer put {name}={token!r} at an unexpected id")
    return tokenizer


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

# ---- a Gemma-style tokenizer and Gemma 3 LMs ---------------------------------------------------

# Gemma's template (role "assistant" is spelled "model"; no system turn, a system message is
# folded into the first user turn like Gemma's own template does).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 1000,
    special_tokens: list[str] | None = None,
    chat_template: str | None = GEMMA_CHAT_TEMPLATE,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: Training text (iterated once).
        vocab_size: Target size including the 256 byte symbols and the special tokens.
        special_tokens: Extra special tokens (e.g. ``codec.sound_token_names(K)``), appended after
            ``BASE_SPECIAL_TOKENS``; they are never split and get ids after the base ones.
        chat_template: Jinja chat template; defaults to Gemma's turn format. ``None`` for none.
        min_frequency: Minimum pair count for a merge.

    Returns:
        A fast tokenizer with ``bos/eos/pad/unk`` set (``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``),
        which ``save_pretrained`` writes and ``AutoTokenizer.from_pretrained`` reloads offline.
    """
    extra = [t for t in (special_tokens or []) if t not in BASE_SPECIAL_TOKENS]
    if len(set(extra)) != len(extra):
        raise ValueError("special_tokens contains duplicates")
    tok = Tokenizer(bpe_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # Only the base tokens go through the trainer; thousands of sound tokens would crowd out
        # the merges if vocab_size counted them.
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Gemma's tokenizer: ``add_special_tokens=True`` prepends <bos> (and nothing else).
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",  # decoder-only generation pads prompts on the left
    )
    if extra:
        fast.add_tokens(extra, special_tokens=True)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


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


# ---- the demo's model set -------------------------------------------------------------------------

ENCODERS = ("gemma4-tiny", "whisper-tiny")


def demo_model_paths(out: str | Path, encoder: str) -> dict[str, str]:
    """Where :func:`save_demo_models` puts each model under ``out`` (``encoder``, ``stage2_lm``, ``stage3_llm``)."""
    root = Path(out)
    if encoder == "gemma4-tiny":
        return {"encoder": str(root / "gemma4_audio"), "stage2_lm": str(root / "stage2_lm"),
                "stage3_llm": str(root / "gemma4_stage3")}  # fmt: skip
    return {"encoder": str(root / "whisper-tiny.en"), "stage2_lm": str(root / "stage2_lm"),
            "stage3_llm": str(root / "stage3_text_lm")}  # fmt: skip


def save_demo_models(out: str | Path, encoder: str, texts: list[str]) -> dict[str, str]:
    """The demo-size models under ``out`` (each built once; kept on a re-run); returns their folders.

    A one-layer Gemma 4 audio encoder with 32 subsampling channels (one layer and 32 channels keep a random
    encoder's states word-discriminative), or the pretrained Whisper tiny.en of the ``pretrained`` extra;
    a 4-layer 128-dim Gemma 3 for stage 2; for stage 3 a tiny Gemma 4 whose audio tower is the stage-1
    encoder, or a 2-layer 64-dim Gemma 3 reading Whisper states through a projector. Tokenizers are
    trained on ``texts``.

    Raises:
        FileNotFoundError: ``whisper-tiny`` without the ``pretrained`` extra.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for folders of a few MB
    paths = demo_model_paths(out, encoder)
    enc, lm, llm = (Path(paths[k]) for k in ("encoder", "stage2_lm", "stage3_llm"))
    if encoder == "gemma4-tiny":
        if not (enc / "config.json").exists():
            save_gemma4_audio_debug(enc, seed=0, num_hidden_layers=1, subsampling_conv_channels=[128, 32])
    elif not (enc / "config.json").exists():
        from models.pretrained_whisper import pretrained_whisper

        if pretrained_whisper(cache_dir=enc.parent) is None:
            raise FileNotFoundError("--encoder whisper-tiny needs the `pretrained` extra (pip install -e '.[pretrained]')")
    if not (lm / "config.json").exists():
        save_gemma3_lm_debug(lm, texts, hidden_size=128, num_layers=4)
    if not (llm / "config.json").exists():
        if encoder == "gemma4-tiny":
            save_gemma4_stage3_debug(llm, encoder_dir=enc, texts=texts)
        else:
            save_gemma3_lm_debug(llm, texts, hidden_size=64, num_layers=2)
    return paths


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Tokenizer text from files: a JSONL's ``instruction`` and ``response`` of each record, else one text a line."""
    texts: list[str] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if str(path).endswith(".jsonl"):
                rec = json.loads(line)
                texts += [rec["instruction"], rec["response"]]
            else:
                texts.append(line)
    return texts


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.tiny``: build the demo-size models (:func:`save_demo_models`); prints their folders."""
    parser = argparse.ArgumentParser(prog="python -m demo.tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder of the models (e.g. runs/NAME/models)")
    parser.add_argument("--encoder", choices=ENCODERS, default="gemma4-tiny", help="the stage-1 encoder")
    parser.add_argument("--texts", nargs="+", required=True,
                        help="tokenizer text: .jsonl files (instruction, response) or text files (one a line)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        paths = save_demo_models(args.out, args.encoder, read_texts(args.texts))
    except FileNotFoundError as err:
        print(f"python -m demo.tiny: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
