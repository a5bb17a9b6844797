"""The Whisper encoder as a frozen stage-1 encoder (the Ichigo / Homebrew Speechless setup).

Follows Ichigo (Homebrew, "Ichigo: Mixed-Modal Early-Fusion Realtime Voice Assistant", 2024) and the
Speechless release: Whisper-medium's encoder output (``last_hidden_state``, 1024-dim at 50 frames/s),
optionally mean-pooled 2x to 25 frames/s before the VQ.

Whisper always sees a full window (30 s for the real models: ``2 * max_source_positions`` mel frames
at 100 frames/s); shorter audio is zero-padded by the feature extractor, and the states past the real
audio are cut off here (``ceil(samples / 320)`` frames). Longer audio is encoded in window-sized
pieces and concatenated, never truncated.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from .base import FrozenEncoder

__all__ = ["WhisperEncoder"]

_SAMPLES_PER_FRAME = 320  # mel hop 160 x conv stride 2


class WhisperEncoder(FrozenEncoder):
    """Frozen Whisper encoder; ``D = d_model`` (1024 for whisper-medium), 50 or 25 frames/s.

    Args:
        source: hub id (``openai/whisper-medium``) or local folder of a Whisper model; only its encoder
            is kept.
        config: instead of ``source``, a ``WhisperConfig`` (or dict of its fields) for random weights.
        revision: hub revision for ``source``.
        pooling: 1 (50 frames/s) or 2 (mean of frame pairs, 25 frames/s, as Ichigo does; an odd last
            frame is kept alone rather than dropped).
        dtype: ``"bf16"`` runs under bf16 autocast.
        level_db, center_states: per-utterance normalisation, see :class:`FrozenEncoder`.
    """

    def __init__(
        self,
        *,
        source: str | None = None,
        config: WhisperConfig | dict[str, Any] | None = None,
        revision: str | None = None,
        pooling: int = 1,
        dtype: Literal["fp32", "bf16"] = "fp32",
        level_db: float | None = None,
        center_states: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, level_db=level_db, center_states=center_states)
        if (source is None) == (config is None):
            raise ValueError("give exactly one of source= (hub id or folder) or config= (random weights)")
        if pooling not in (1, 2):
            raise ValueError(f"pooling must be 1 or 2, got {pooling}")
        if source is not None:
            model = WhisperModel.from_pretrained(source, revision=revision, dtype=torch.float32)
            extractor = WhisperFeatureExtractor.from_pretrained(source, revision=revision)
        else:
            if isinstance(config, dict):
                config = WhisperConfig(**config)
            model = WhisperModel(config)
            window_s = 2 * config.max_source_positions * 160 / self.sample_rate
            if window_s != int(window_s):
                raise ValueError(
                    f"max_source_positions={config.max_source_positions} is not a whole-second window"
                )
            extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=int(window_s))
        encoder = model.get_encoder()
        window = 2 * encoder.config.max_source_positions * extractor.hop_length
        if extractor.sampling_rate != self.sample_rate or extractor.n_samples != window:
            raise ValueError(
                f"feature extractor window {extractor.n_samples} samples at {extractor.sampling_rate} Hz does "
                f"not match the encoder's {window} samples at {self.sample_rate} Hz"
            )
        self._set_model(encoder)
        self.extractor = extractor
        self.kind = "whisper"
        self.source = source
        self.layer = "last"
        self.pooling = pooling
        self.chunk_samples = window

    @property
    def dim(self) -> int:
        return int(self._model.config.d_model)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / (_SAMPLES_PER_FRAME * self.pooling)

    def num_frames(self, num_samples: Tensor) -> Tensor:
        # Full windows are whole multiples of the (pooled) frame, so the per-piece ceil adds up.
        n = torch.as_tensor(num_samples).long()
        step = _SAMPLES_PER_FRAME * self.pooling
        return torch.div(n + step - 1, step, rounding_mode="floor")

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        items = [a[:n].cpu().numpy() for a, n in zip(audio.float(), lengths.tolist())]
        feats = self.extractor(
            items, sampling_rate=self.sample_rate, padding="max_length", return_tensors="pt"
        )
        with self._autocast():
            states = self._model(feats["input_features"].to(audio.device, self.model_dtype))
        states = states.last_hidden_state  # [B, W, D], W = the whole window
        frames = torch.div(lengths + _SAMPLES_PER_FRAME - 1, _SAMPLES_PER_FRAME, rounding_mode="floor")
        if self.pooling == 2:
            states, frames = _pair_mean(states, frames)
        return states, frames


def _pair_mean(states: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of frame pairs over real frames only: ``[B, T, D] -> [B, ceil(T/2), D]``."""
    batch, t, d = states.shape
    mask = (torch.arange(t, device=states.device)[None, :] < frames[:, None]).to(states.dtype)
    states = F.pad(states * mask[..., None], (0, 0, 0, t % 2))
    mask = F.pad(mask, (0, t % 2))
    summed = states.view(batch, -1, 2, d).sum(2)
    count = mask.view(batch, -1, 2).sum(2).clamp_min(1)
    return summed / count[..., None], torch.div(frames + 1, 2, rounding_mode="floor")
