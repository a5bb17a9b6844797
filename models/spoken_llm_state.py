"""``SpokenLLM``'s trained state: the adapter-only state dict of checkpoints, the PEFT adapter and the merged export."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from models.peft_export import export_merged

__all__ = ["DTYPES", "TrainableState"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainableState:
    """What :class:`models.spoken_llm.SpokenLLM` trains, saves and exports (a mixin)."""

    # --------------------------------------------------------------------------------- checkpoints
    def _trainable(self) -> dict[str, nn.Parameter]:
        params = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        if self.projector is not None:  # peft's names start with "base_model.": no clash
            params.update({f"projector.{n}": p for n, p in self.projector.named_parameters()})
        return params

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained weights (LoRA, new token rows, a trained embedder, ``projector.*``), detached.

        Keys are the PEFT model's parameter names, and ``projector.<name>`` for the projector's.
        """
        return {n: p.detach().clone() for n, p in self._trainable().items()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ``trainable_state_dict()`` output; the key sets must match exactly."""
        params = self._trainable()
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter in PEFT format (``adapter_model.safetensors`` + ``adapter_config.json``) and tokenizer.

        With a projector also ``projector.json`` + ``projector.safetensors`` (``AudioProjector.load``
        rebuilds it; ``load_projector`` puts it into a model built with the same arguments).
        """
        directory = Path(directory)
        self.peft_model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.projector is not None:
            self.projector.save(directory)
        return directory

    def export_merged(
        self, directory: str | Path, *, dtype: Literal["bf16", "fp16", "fp32"] | None = None
    ) -> Path:
        """Merge LoRA (and token rows) into a fresh copy of the base and save a Hugging Face folder.

        The copy is reloaded from ``model`` so this module keeps training; the folder holds safetensors
        weights, config, tokenizer and (when the source has one) processor / feature extractor, and loads
        with ``AutoModelForCausalLM`` / ``Gemma4ForConditionalGeneration.from_pretrained`` or vLLM. A
        projector is no part of the LLM: it stays with the adapter (``save_adapter``).
        """
        kwargs = {**self._load_kwargs, **({"dtype": DTYPES[dtype]} if dtype else {})}
        return export_merged(self.peft_model, source=self.model_name, tokenizer=self.tokenizer, directory=directory, **kwargs)
