"""Decode steps both output forms of :class:`models.speech_lm.SpeechLM` share: choosing ids,
classifier-free guidance over a doubled batch, and the median end-of-speech rule."""

from __future__ import annotations

import torch

__all__ = ["guide", "median_stop", "pick", "twice"]


def pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    """Choose ids from ``logits [N, V]`` (``-inf`` marks disallowed) -> ``[N]``."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """Rows ``[c; u]`` (``2B``) -> guided ``u + s (c - u)`` (``B``); unchanged without guidance."""
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def twice(x: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """The next inputs of ``B`` rows, repeated for the unprompted half under guidance."""
    return x if cfg_scale is None else torch.cat([x, x])


def median_stop(logits: torch.Tensor, eos: int, survival: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Update ``survival`` (P(speech goes on)) with this step's end hazard; force/forbid the end.

    Returns the masked ``logits`` (end forced where survival fell below 1/2, forbidden elsewhere)
    and the new survival.
    """
    survival = survival * (1 - logits.float().softmax(-1)[:, eos])
    stop = (survival < 0.5).unsqueeze(1)
    is_eos = torch.zeros_like(logits, dtype=torch.bool)
    is_eos[:, eos] = True
    return logits.masked_fill(stop ^ is_eos, float("-inf")), survival
