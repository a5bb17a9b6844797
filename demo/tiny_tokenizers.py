"""Small trained tokenizers that stand in for Gemma's offline: Gemma 4's special tokens, or Gemma's turn format.

:func:`gemma4_tokenizer_debug` trains a BPE with Gemma 4's special-token strings at ids ``0..16`` and
its named tokens (``tokenizer.audio_token``...); :func:`train_tokenizer` trains a byte-level BPE
with Gemma's ``<start_of_turn>`` template (the stage-2 LM, a text-only stage-3 LM, tiny Whisper).
Part of :mod:`demo.tiny`, which re-exports every name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as bpe_models
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BASE_SPECIAL_TOKENS",
    "GEMMA4_CHAT_TEMPLATE",
    "GEMMA4_SPECIAL_TOKENS",
    "GEMMA_CHAT_TEMPLATE",
    "gemma4_tokenizer_debug",
    "train_tokenizer",
]

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


def _gemma_fast(tok: Tokenizer, **special: Any) -> PreTrainedTokenizerFast:
    """``tok`` as a fast tokenizer with Gemma's ``<bos>``/``<eos>``/``<pad>``/``<unk>`` and ``special``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",  # decoder-only generation pads prompts on the left
        **special,
    )  # fmt: skip


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
    tokenizer = _gemma_fast(tok, mask_token="<mask>", extra_special_tokens=dict(_GEMMA4_NAMED_TOKENS))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|video|>", *extra]})
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE
    for name, token in _GEMMA4_NAMED_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) != GEMMA4_SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"tiny tokenizer put {name}={token!r} at an unexpected id")
    return tokenizer


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
    fast = _gemma_fast(tok, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    if extra:
        fast.add_tokens(extra, special_tokens=True)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
