"""Merge a PEFT model (LoRA, trainable token rows) into a fresh copy of its base: a plain HF folder.

The copy is reloaded from the source so the training model is left untouched; the folder holds
safetensors weights, config, tokenizer and (when the source has one) processor / feature extractor,
and loads with ``AutoModelForCausalLM`` / ``Gemma4ForConditionalGeneration.from_pretrained`` or vLLM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoProcessor

__all__ = ["export_merged"]


def export_merged(peft_model, *, source: str, tokenizer, directory: str | Path, **load_kwargs: Any) -> Path:
    """Write ``peft_model`` merged into ``source``'s weights to ``directory``.

    Args:
        peft_model: The trained ``PeftModel``.
        source: Hub id or folder of its base model.
        tokenizer: The tokenizer it was trained with (may hold added sound tokens: the base is resized).
        directory: Output folder.
        **load_kwargs: ``from_pretrained`` keyword arguments of the base (``dtype``, ...).

    Returns:
        The folder.
    """
    directory = Path(directory)
    base = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    for loader in (AutoProcessor, AutoFeatureExtractor):
        try:
            loader.from_pretrained(source).save_pretrained(directory)
            break
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a source without a processor (text-only LM) still exports
    tokenizer.save_pretrained(directory)  # last: carries the added sound tokens
    return directory
