"""A trainable projector from any frozen speech encoder's states into a causal LM's embedding space.

Follows Ultravox (fixie-ai/ultravox, ``ultravox_model.py``: ``StackAudioFrames`` + ``UltravoxProjector``):
``k`` consecutive encoder frames are concatenated (the last group zero-padded, so ``T`` frames give
``ceil(T / k)`` LLM positions), then ``norm -> Linear -> activation -> Linear -> norm`` into the LLM's
width. Ultravox uses RMSNorm and SwiGLU with ``k = 8`` on Whisper's 50 frames/s; here both norms are
LayerNorms and the activation is GELU (or SiLU), a plain two-layer MLP as in SLAM-LLM's
``EncoderProjectorConcat`` (stack ``k = 5``, Linear-ReLU-Linear, no norms, which drops the last partial
group instead of padding it: a short instruction keeps every frame here). The pre-norm puts encoders of
very different scales (Whisper, HuBERT, Gemma 4) on one footing; the post-norm starts the outputs at
unit scale per channel, the scale of Gemma's ``sqrt(H)``-scaled token embeddings, and learns its gain.

The projector is what stage 3 trains, with LoRA, when the LLM has no audio path of its own for the
encoder (``models.spoken_llm.SpokenLLM``, ``audio_path="projector"``). :meth:`AudioProjector.save`
writes ``projector.json`` (its keyword arguments) and ``projector.safetensors``; :meth:`AudioProjector.load`
rebuilds it from those two files alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["AudioProjector", "stack_frames"]

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
CONFIG_NAME, WEIGHTS_NAME = "projector.json", "projector.safetensors"


def stack_frames(states: torch.Tensor, lengths: torch.Tensor, stack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``stack`` consecutive frames: ``[B, T, D] -> [B, ceil(T / k), k * D]``.

    Frames past an item's length are zeroed first, so an item gives the same groups alone or padded
    in a batch; its last group is zero-padded when its length is not a multiple of ``stack``.

    Args:
        states: ``[B, T, D]`` frame states.
        lengths: ``[B]`` valid frames per item.
        stack: ``k``, frames per group.

    Returns:
        The groups ``[B, ceil(T / k), k * D]`` and their valid counts ``ceil(lengths / k)`` ``[B]``.
    """
    b, t, d = states.shape
    valid = torch.arange(t, device=states.device)[None] < lengths.to(states.device)[:, None]  # [B, T]
    states = states * valid[..., None].to(states.dtype)
    states = F.pad(states, (0, 0, 0, (-t) % stack))  # [B, k * ceil(T / k), D]
    groups = torch.div(lengths + stack - 1, stack, rounding_mode="floor")
    return states.reshape(b, -1, stack * d), groups


class AudioProjector(nn.Module):
    """Frame stacking + a two-layer MLP: encoder states ``[B, T, D]`` -> LLM embeddings ``[B, ceil(T/k), H]``.

    Args:
        input_dim: ``D``, the width of the encoder states (the stage-1 RVQ's ``dim``).
        output_dim: ``H``, the LLM's embedding width (``hidden_size``).
        stack: ``k``, consecutive frames per LLM position (2 on 25 frames/s Gemma 4 states and 4 on
            50 frames/s Whisper states both give 12.5 positions/s).
        hidden_dim: Width of the MLP's hidden layer (default ``H``).
        activation: ``"gelu"`` or ``"silu"``.
    """

    def __init__(
        self,
        *,
        input_dim: int,
        output_dim: int,
        stack: int = 4,
        hidden_dim: int | None = None,
        activation: Literal["gelu", "silu"] = "gelu",
    ) -> None:
        super().__init__()
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if min(input_dim, output_dim, hidden_dim or output_dim) < 1:
            raise ValueError(f"widths must be >= 1, got input {input_dim}, output {output_dim}, hidden {hidden_dim}")
        self.input_dim, self.output_dim, self.stack = int(input_dim), int(output_dim), int(stack)
        self.hidden_dim = int(hidden_dim or output_dim)
        self.activation = activation
        self.norm_in = nn.LayerNorm(self.stack * self.input_dim)
        self.linear_in = nn.Linear(self.stack * self.input_dim, self.hidden_dim)
        self.act = _ACTIVATIONS[activation]()
        self.linear_out = nn.Linear(self.hidden_dim, self.output_dim)
        self.norm_out = nn.LayerNorm(self.output_dim)

    def num_positions(self, frames: int) -> int:
        """LLM positions of ``frames`` encoder frames: ``ceil(frames / stack)``."""
        return -(-int(frames) // self.stack)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project a padded batch of encoder states.

        Args:
            states: ``[B, T, D]`` encoder states (any float dtype; computed in the projector's).
            lengths: ``[B]`` valid frames per item.

        Returns:
            ``[B, ceil(T / k), H]`` embeddings and ``[B]`` valid positions per item (``ceil(lengths / k)``).

        Raises:
            ValueError: When ``D`` is not ``input_dim`` (states of another encoder than the projector's).
        """
        if states.ndim != 3 or states.shape[-1] != self.input_dim:
            raise ValueError(
                f"the projector reads [B, T, {self.input_dim}] encoder states, got {tuple(states.shape)}: "
                f"states of a {states.shape[-1]}-dim encoder need audio_dim={states.shape[-1]}"
            )
        stacked, groups = stack_frames(states.to(self.linear_in.weight.dtype), lengths, self.stack)
        hidden = self.act(self.linear_in(self.norm_in(stacked)))
        return self.norm_out(self.linear_out(hidden)), groups

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this projector (``projector.json``)."""
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "stack": self.stack,
                "hidden_dim": self.hidden_dim, "activation": self.activation}  # fmt: skip

    def save(self, directory: str | Path) -> Path:
        """Write ``projector.json`` and ``projector.safetensors`` (float32) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1) + "\n")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME))  # fmt: skip
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AudioProjector:
        """Rebuild a :meth:`save`-d projector: its keyword arguments from JSON, its weights from safetensors."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        if not isinstance(config, dict) or not all(isinstance(v, (int, str, type(None))) for v in config.values()):
            raise ValueError(f"{directory / CONFIG_NAME}: not an object of integer/string arguments")
        projector = cls(**config)
        projector.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))  # strict: every weight, no other
        return projector
