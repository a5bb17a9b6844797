"""The Whisper encoder as a frozen stage-1 encoder (the Ichigo / Homebrew Speechless setup).

Follows Ichigo (Homebrew, "Ichigo: Mixed-Modal Early-Fusion Realtime Voice Assistant", 2024) and the
Speechless release: Whisper-medium's encoder output (``last_hidden_state``, 1024-dim at 50 frames/s),
optionally mean-pooled 2x to 25 frames/s before the VQ.

Two ways to present a clip to the encoder (``window=``); both give ``ceil(samples / 320)`` frames per
clip, and longer audio is encoded in window-sized pieces and concatenated, never truncated:

- ``"full"`` (default): what Whisper was trained on and what Ichigo does. Every clip is zero-padded
  to the whole window (30 s for the real models: ``2 * max_source_positions`` mel frames at
  100 frames/s), encoded, and the states past the real audio are cut off. The states of a 1 s clip
  have attended to 29 s of padding; the cost is that of 30 s of audio whatever the clip's length.
- ``"clip"``: the encoder runs on the clip's real length. Mel features are computed for the real
  audio plus one frame of trailing silence (which the stride-2 conv reads at the last real frame,
  exactly as in the full window), padded to the batch's longest as an even number of mel frames; the
  conv stack and the transformer blocks are called here with the positional table sliced to that
  length (``embed_positions.weight[:T]``; transformers' ``WhisperEncoder.forward`` insists on the
  whole window) and a key-padding attention mask, so a clip's states do not depend on the other
  clips in its batch. The real frames see the same mel features, convolutions and positions as in
  ``"full"``; what changes is only that they no longer attend to the padded frames. A clip of exactly
  one window gives the ``"full"`` states.

Which to use (``describe()`` records ``window`` when it is ``"clip"``, so a stage-1 artifact and its
later users cannot mix the two). Measured with whisper-tiny.en on real clips, one CPU thread
(``benchmarks/bench_whisper_length.py``): ``"clip"`` is ~4.5x faster on 1.5-16 s English clips and
~40x on FSDD digits (~0.4 s each; ~70x batched); the states move little on the English clips
(per-frame cosine to ``"full"`` 0.986, pooled 0.985) and much on the short digits (0.72, pooled
0.77), yet classify the digits as well (nearest class centroid of pooled states, 5 FSDD speakers ->
500 clips of the held-out ``yweweler``: 0.942 vs 0.948 for ``"full"``).

- Stage-1 tokenizing (RVQ training, tokenizing shards) and stage-3 input: either serves. ``"full"``
  stays the default: Ichigo's WhisperVQ setup, and what artifacts made before the option hold.
  ``"clip"`` is the better choice for a new tokenizer over a corpus of short utterances (the same
  digit accuracy at a fortieth of the encoding time). Training and inference use the same one
  (the artifact enforces it).
- Anything that feeds the states to the (frozen) Whisper *decoder*, such as a stage-2
  intelligibility check by Whisper transcription: ``"full"`` only. The decoder was trained to
  cross-attend to 1500 full-window states (speech plus encoded silence); the clip-length states
  of short clips are far from those (per-frame cosine 0.72 above).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.masking_utils import create_bidirectional_mask

from .base import FrozenEncoder, lengths_to_mask

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
        window: ``"full"`` (every clip padded to Whisper's whole window, as it was trained; what its
            decoder reads) or ``"clip"`` (the encoder runs on the batch's real length with a padding
            mask; cheaper, and a clip's states do not depend on its batch). See the module docstring.
        clip_silence_s: in ``"clip"`` mode, seconds of trailing silence each clip's frames also attend
            to (the states are still cut at the clip's end). What the full window gives every clip,
            at a fraction of its cost: the Whisper decoder reads sub-second clips' states badly
            without it and about as well as full-window ones with 2 s (see the module docstring).
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
        window: Literal["full", "clip"] = "full",
        clip_silence_s: float = 0.0,
        dtype: Literal["fp32", "bf16"] = "fp32",
        level_db: float | None = None,
        center_states: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, level_db=level_db, center_states=center_states)
        if (source is None) == (config is None):
            raise ValueError("give exactly one of source= (hub id or folder) or config= (random weights)")
        if pooling not in (1, 2):
            raise ValueError(f"pooling must be 1 or 2, got {pooling}")
        if window not in ("full", "clip"):
            raise ValueError(f"window must be 'full' or 'clip', got {window!r}")
        if clip_silence_s < 0 or (clip_silence_s and window != "clip"):
            raise ValueError(f"clip_silence_s must be >= 0 and goes with window='clip', got {clip_silence_s}")
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
        window_samples = 2 * encoder.config.max_source_positions * extractor.hop_length
        if extractor.sampling_rate != self.sample_rate or extractor.n_samples != window_samples:
            raise ValueError(
                f"feature extractor window {extractor.n_samples} samples at {extractor.sampling_rate} Hz does "
                f"not match the encoder's {window_samples} samples at {self.sample_rate} Hz"
            )
        self._set_model(encoder)
        self.extractor = extractor
        self.kind = "whisper"
        self.source = source
        self.layer = "last"
        self.pooling = pooling
        self.window = window
        self.clip_silence_s = float(clip_silence_s)
        self.chunk_samples = window_samples

    @property
    def dim(self) -> int:
        return int(self._model.config.d_model)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / (_SAMPLES_PER_FRAME * self.pooling)

    def describe(self) -> dict[str, Any]:
        """As :meth:`FrozenEncoder.describe`, plus ``"window": "clip"`` in clip mode (and its
        ``clip_silence_s`` when set).

        Only the non-default value is written, so artifacts made before the option existed (always
        full-window states) still match a ``window="full"`` encoder.
        """
        extra: dict[str, Any] = {"window": "clip"} if self.window == "clip" else {}
        if self.clip_silence_s:
            extra["clip_silence_s"] = self.clip_silence_s
        return {**super().describe(), **extra}

    def num_frames(self, num_samples: Tensor) -> Tensor:
        # The same in both windows. Full windows are whole multiples of the (pooled) frame, so the
        # per-piece ceil of chunked long audio adds up.
        n = torch.as_tensor(num_samples).long()
        step = _SAMPLES_PER_FRAME * self.pooling
        return torch.div(n + step - 1, step, rounding_mode="floor")

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        items = [a[:n].cpu().numpy() for a, n in zip(audio.float(), lengths.tolist())]
        frames = torch.div(lengths + _SAMPLES_PER_FRAME - 1, _SAMPLES_PER_FRAME, rounding_mode="floor")
        if self.window == "full":
            feats = self.extractor(
                items, sampling_rate=self.sample_rate, padding="max_length", return_tensors="pt"
            )
            with self._autocast():
                states = self._model(feats["input_features"].to(audio.device, self.model_dtype))
            states = states.last_hidden_state  # [B, W, D], W = the whole window
        else:
            states = self._encode_clip(items, frames.to(audio.device), audio.device)  # [B, max(frames), D]
        if self.pooling == 2:
            states, frames = _pair_mean(states, frames)
        return states, frames

    def _encode_clip(self, items: list, frames: Tensor, device: torch.device) -> Tensor:
        """Run Whisper's encoder on ``T = max(frames)`` positions instead of its whole window.

        The layers are those of ``transformers``' ``WhisperEncoder``; its ``forward`` is bypassed
        because it rejects anything but the whole window and takes no attention mask.

        Args:
            items: ``B`` float32 numpy clips (real samples only, each ``<= window``).
            frames: ``[B]`` long real frames per clip (``ceil(samples / 320)``).
            device: where to run.

        Returns:
            ``[B, T, D]`` states; rows past a clip's frames are padding (cut by the caller).
        """
        enc = self._model
        # The frames each clip attends to: its own, plus clip_silence_s of the silence that follows
        # it (as in the full window; the states are cut at ``frames`` by the caller).
        silence = round(self.clip_silence_s * self.sample_rate / _SAMPLES_PER_FRAME)
        attended = (frames + silence).clamp(max=enc.config.max_source_positions)
        t = int(attended.max())
        # One frame (two mel frames) past the longest clip: conv1 at a clip's last real mel frame
        # reads the next one, which in the full window is the mel of trailing silence; give it the
        # same. A clip of a whole window has no such frame in the full window either.
        t_in = min(t + 1, enc.config.max_source_positions)
        feats = self.extractor(
            items,
            sampling_rate=self.sample_rate,
            padding="max_length",
            max_length=t_in * _SAMPLES_PER_FRAME,
            return_tensors="pt",
        )["input_features"].to(device, self.model_dtype)  # [B, n_mels, 2 * t_in]
        with self._autocast():
            x = F.gelu(enc.conv1(feats))
            x = F.gelu(enc.conv2(x))  # [B, D, t_in]
            x = x.transpose(1, 2)[:, :t] + enc.embed_positions.weight[:t]  # [B, T, D]
            # Padded keys masked: a clip's real frames see only its own frames (None if no padding).
            mask = create_bidirectional_mask(
                config=enc.config, inputs_embeds=x, attention_mask=lengths_to_mask(attended, t)
            )
            for layer in enc.layers:
                x = layer(x, mask)
            return enc.layer_norm(x)


def _pair_mean(states: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of frame pairs over real frames only: ``[B, T, D] -> [B, ceil(T/2), D]``."""
    batch, t, d = states.shape
    mask = (torch.arange(t, device=states.device)[None, :] < frames[:, None]).to(states.dtype)
    states = F.pad(states * mask[..., None], (0, 0, 0, t % 2))
    mask = F.pad(mask, (0, t % 2))
    summed = states.view(batch, -1, 2, d).sum(2)
    count = mask.view(batch, -1, 2).sum(2).clamp_min(1)
    return summed / count[..., None], torch.div(frames + 1, 2, rounding_mode="floor")
