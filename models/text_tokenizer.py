"""A small byte-level BPE tokenizer trained locally, standing in for Gemma's tokenizer offline.

Tests and the demo must not touch the hub (see ``../shared/DESIGN.md``), yet the stage-2 and
stage-3 code paths call ``apply_chat_template``, ``save_pretrained`` and
``AutoTokenizer.from_pretrained`` exactly as with a real Gemma tokenizer. This module trains a
byte-level BPE with the HF ``tokenizers`` library (GPT-2-style byte alphabet, so every string
encodes and no ``<unk>`` is ever produced) and wraps it as a ``PreTrainedTokenizerFast`` with
Gemma's special tokens and Gemma's chat-turn format::

    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["GEMMA_CHAT_TEMPLATE", "BASE_SPECIAL_TOKENS", "train_tokenizer"]

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
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
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
