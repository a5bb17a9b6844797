"""Log-mel features as a weight-free frozen encoder, for quick tests and the tiny demo.

Follows the Whisper front end (``transformers.WhisperFeatureExtractor``: periodic Hann window,
Slaney mel filterbank, power spectrum) without its per-utterance clamping and rescaling, so each frame
depends only on its own window. Frames are centred with zero padding, so a padded batch gives each
item exactly the frames it gets alone: ``samples // hop_length + 1`` frames at
``16000 / hop_length`` frames/s.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor
from transformers.audio_utils import mel_filter_bank

from .base import FrozenEncoder

__all__ = ["LogMelEncoder"]


class LogMelEncoder(FrozenEncoder):
    """Log-mel spectrogram ``[B, T, n_mels]``; no weights, nothing to checkpoint.

    Args:
        n_mels: mel bins, the state dim ``D``.
        n_fft: FFT size and window length in samples (400 = 25 ms).
        hop_length: hop in samples; 160 gives 100 frames/s, 640 gives Gemma 4's 25 frames/s.
        f_min: lowest filter edge in Hz.
        f_max: highest filter edge in Hz (default: Nyquist).
        floor: power floor before the log (avoids ``log(0)`` on silence).
        dtype: accepted for a uniform interface; the STFT always runs in float32.
        level_db, center_states: per-utterance normalisation, see :class:`FrozenEncoder`.
    """

    def __init__(
        self,
        *,
        n_mels: int = 80,
        n_fft: int = 400,
        hop_length: int = 160,
        f_min: float = 0.0,
        f_max: float | None = None,
        floor: float = 1e-10,
        dtype: Literal["fp32", "bf16"] = "fp32",
        level_db: float | None = None,
        center_states: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, level_db=level_db, center_states=center_states)
        if n_mels < 1 or n_fft < 2 or hop_length < 1:
            raise ValueError(
                f"need n_mels >= 1, n_fft >= 2, hop_length >= 1; got {n_mels}, {n_fft}, {hop_length}"
            )
        f_max = self.sample_rate / 2 if f_max is None else f_max
        fb = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=f_min,
            max_frequency=f_max,
            sampling_rate=self.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        # Non-persistent: derived from the constructor args, so they never enter a checkpoint.
        self.register_buffer("mel_fb", torch.from_numpy(np.asarray(fb, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.n_mels, self.n_fft, self.hop_length, self.floor = n_mels, n_fft, hop_length, floor
        self.kind = "logmel"
        self.layer = f"mel{n_mels}_fft{n_fft}_hop{hop_length}"

    @property
    def dim(self) -> int:
        return self.n_mels

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: Tensor) -> Tensor:
        return torch.div(torch.as_tensor(num_samples).long(), self.hop_length, rounding_mode="floor") + 1

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = torch.stft(
                audio.float(),
                self.n_fft,
                hop_length=self.hop_length,
                window=self.window.float(),
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # [B, F, T]
            power = spec.abs() ** 2
            mel = torch.einsum("bft,fm->btm", power, self.mel_fb.float())
            return torch.log(mel.clamp_min(self.floor)), self.num_frames(lengths)
