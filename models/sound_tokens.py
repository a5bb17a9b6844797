"""Speech as sound tokens for a text-only causal LM (stage 3, ``input_mode="tokens"``).

Follows Ichigo / Speechless (Homebrew, arXiv:2410.15316, arXiv:2505.17417): semantic codes are
written into the prompt as ``<|sound_start|><|sound_0123|>...<|sound_end|>`` and the LLM's
vocabulary grows by those tokens. An RVQ has ``Q`` levels; the first ``levels`` of them are written
frame by frame, levels interleaved (``models.codec.frames_to_string``): ``levels=1`` is Ichigo's
level-0 string, ``levels=Q`` hands the LLM everything the RVQ carries at ``Q`` tokens per frame.

Real speech takes the path the synthetic codes stand for: 16 kHz audio -> the frozen stage-1 encoder
(rebuilt from the stage-1 artifact, with its own level/centering normalisation) -> the stage-1 RVQ's
``encode`` -> the same string.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from models.codec import frame_token_names, frames_to_string, string_to_frames

__all__ = ["SoundTokens", "speech_to_codes"]


class SoundTokens:
    """Codes ``[Q, T]`` <-> the sound-token text of a prompt.

    Args:
        codebook_size: Entries per RVQ codebook ``K``.
        num_levels: RVQ levels ``Q`` the codes have.
        levels: Leading levels written per frame, ``1 <= levels <= Q`` (1: Ichigo's level-0 tokens).
        compress: Collapse runs of identical frames with ``<|duration_nn|>`` tokens.
    """

    def __init__(
        self, *, codebook_size: int, num_levels: int, levels: int = 1, compress: bool = False
    ) -> None:
        if not 1 <= levels <= num_levels:
            raise ValueError(f"sound_levels must be in [1, num_levels={num_levels}], got {levels}")
        self.codebook_size, self.num_levels = codebook_size, num_levels
        self.levels, self.compress = levels, bool(compress)

    def token_names(self) -> list[str]:
        """Every token :meth:`text` can write (what the LLM's vocabulary must hold)."""
        return frame_token_names(self.codebook_size, num_levels=self.levels, with_durations=self.compress)

    def text(self, codes: torch.Tensor | np.ndarray) -> str:
        """``[Q, T]`` codes of one utterance (no padding) -> ``<|sound_start|>...<|sound_end|>``."""
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_levels or codes.shape[1] < 1:
            raise ValueError(f"codes must be [{self.num_levels}, T >= 1], got {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(
                f"codes outside [0, {self.codebook_size}): min {int(codes.min())}, max {int(codes.max())}"
            )
        return frames_to_string(codes[: self.levels], compress=self.compress)

    def codes(self, text: str) -> np.ndarray:
        """Inverse of :meth:`text`: int64 ``[levels, T]``."""
        return string_to_frames(text, num_levels=self.levels)

    def describe(self) -> dict:
        """What an artifact records so inference writes the same strings."""
        return {"format": "frames_interleaved", "levels": self.levels, "compress": self.compress}


@torch.no_grad()
def speech_to_codes(
    encoder: nn.Module, rvq: nn.Module, waveforms: Sequence[np.ndarray]
) -> list[torch.Tensor]:
    """16 kHz mono waveforms -> frozen encoder -> RVQ codes, one ``[Q, T_i]`` long tensor each.

    Args:
        encoder: A ``models.encoders.FrozenEncoder`` (applies its own ``level_db``/``center_states``).
        rvq: The stage-1 quantizer (``encode(states [B, T, D], mask [B, T]) -> [B, Q, T]``).
        waveforms: ``[N_i]`` float arrays; long ones are chunked by the encoder, never truncated.

    Returns:
        Codes of the valid frames, on the CPU.
    """
    lengths = torch.tensor([len(w) for w in waveforms])
    audio = nn.utils.rnn.pad_sequence(
        [torch.as_tensor(np.asarray(w, dtype=np.float32)) for w in waveforms], batch_first=True
    )
    device = encoder.device
    # Outside any caller's autocast: nearest-code search in bf16 would pick other codes than stage 1 did.
    with torch.autocast(device_type=device.type, enabled=False):
        out = encoder(audio.to(device), lengths.to(device))
        codes = rvq.encode(out.states.float(), out.mask)
    codes = getattr(codes, "codes", codes)  # [N, Q, T]
    return [codes[i, :, :n].cpu() for i, n in enumerate(out.lengths.tolist())]
