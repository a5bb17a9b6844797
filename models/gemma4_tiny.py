"""A tiny random-weight Gemma 4 (audio + text) with a local tokenizer, for tests and the demo.

Follows the layout of the audio-capable Gemma 4 checkpoints (``google/gemma-4-E4B-it``, also
``google/gemma-4-E2B-it``): a ``Gemma4ForConditionalGeneration`` with an audio tower whose
``output_proj`` feeds the ``embed_audio`` embedder, and a tokenizer whose special tokens carry the
same strings as the real one (``<|turn>``/``<turn|>`` turns, ``<|audio>`` ``<|audio|>`` ``<audio|>``
for audio). Only the ids differ: the tiny vocabulary is a few hundred tokens, and the config's
``boa_token_id``/``audio_token_id``/``eoa_token_index`` point at the tiny tokenizer's ids.

``build_tiny_gemma4(path)`` writes a folder that ``from_pretrained(path)`` loads exactly like the hub
id, so tests, the demo and real runs share one code path. The audio feature extractor is saved too
(``AutoFeatureExtractor.from_pretrained(path)``); the full ``Gemma4Processor`` also needs image and
video processors (the video one needs torchvision), so it is not written here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioFeatureExtractor,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    PreTrainedTokenizerFast,
)

__all__ = [
    "CHAT_TEMPLATE",
    "REAL_MODEL_ID",
    "SPECIAL_TOKENS",
    "build_tiny_gemma4",
    "build_tiny_tokenizer",
    "tiny_gemma4_config",
]

# The audio-capable instruction-tuned Gemma 4 the real stage-3 run fine-tunes (E2B is the smaller sibling).
REAL_MODEL_ID = "google/gemma-4-E4B-it"

# Gemma 4's special-token strings, in the order they get ids 0.. in the tiny vocabulary.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|audio>", "<audio|>", "<|audio|>",
    "<|image>", "<image|>", "<|image|>", "<|video|>",
]  # fmt: skip

# Attribute names the Gemma 4 tokenizer exposes (tokenizer.audio_token, tokenizer.boa_token, ...).
_MODEL_SPECIFIC = {
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
CHAT_TEMPLATE = (
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


def build_tiny_tokenizer(
    *, texts: Iterable[str] | None = None, vocab_size: int = 384, extra_tokens: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer with Gemma 4's special tokens at ids ``0..len(SPECIAL_TOKENS)-1``.

    Args:
        texts: Training text; a few built-in sentences when ``None``.
        vocab_size: Target vocabulary size (special tokens and the ASCII alphabet included).
        extra_tokens: Further special tokens (e.g. sound tokens) appended after the trained vocabulary.

    Returns:
        A ``PreTrainedTokenizerFast`` with the chat template and Gemma 4's named special tokens.
    """
    texts = list(texts) if texts is not None else list(_DEFAULT_TEXTS)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Gemma's SentencePiece model adds no dummy prefix: "▁" marks only spaces inside the text.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra = [t for t in extra_tokens if t not in SPECIAL_TOKENS]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=dict(_MODEL_SPECIFIC),
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video|>", *extra]})
    tokenizer.chat_template = CHAT_TEMPLATE
    for name, token in _MODEL_SPECIFIC.items():
        if tokenizer.convert_tokens_to_ids(token) != SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"tiny tokenizer put {name}={token!r} at an unexpected id")
    return tokenizer


def tiny_gemma4_config(*, vocab_size: int, hidden_size: int = 64, num_layers: int = 2) -> Gemma4Config:
    """A Gemma 4 config of a few layers and dims of 8 to 64, with the audio tower on and vision off.

    Args:
        vocab_size: Text vocabulary size; must cover the tokenizer (``len(tokenizer)``).
        hidden_size: Text hidden size.
        num_layers: Text decoder layers (the last one uses full attention, the others sliding).

    Returns:
        A ``Gemma4Config`` whose special-token ids match ``build_tiny_tokenizer``.
    """
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
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


def build_tiny_gemma4(path: str | Path, *, seed: int = 0, texts: Iterable[str] | None = None) -> Path:
    """Save a random-weight tiny ``Gemma4ForConditionalGeneration`` with its tokenizer and feature extractor.

    Args:
        path: Output folder (created).
        seed: Torch seed for the random weights.
        texts: Tokenizer training text (see ``build_tiny_tokenizer``).

    Returns:
        The folder, loadable with ``Gemma4ForConditionalGeneration.from_pretrained`` /
        ``AutoTokenizer.from_pretrained`` / ``AutoFeatureExtractor.from_pretrained``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(texts=texts)
    config = tiny_gemma4_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Gemma4AudioFeatureExtractor().save_pretrained(path)
    (path / "tiny_gemma4.json").write_text(json.dumps({"seed": seed, "stands_in_for": REAL_MODEL_ID}) + "\n")
    return path
