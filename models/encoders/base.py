"""The frozen-encoder interface every stage-1 speech encoder implements.

A frozen encoder turns 16 kHz mono audio ``[B, N]`` into frame states ``[B, T, D]`` with a frame
mask, and never trains: it stays in eval mode, its parameters need no grad, its forward runs under
``torch.no_grad()``, and its weights stay out of every checkpoint (``../shared/DESIGN.md``: "an RVQ
checkpoint holds the RVQ, not the 305M-parameter encoder"). The weights are reloaded from their
source (a hub id or a local folder) instead, which ``describe()`` names so later stages can detect a
mismatch.

How the weights stay out of checkpoints: the wrapped network is stored as a plain attribute, hidden
from ``nn.Module`` registration, so ``state_dict()``, ``parameters()`` (and so optimisers) and model
summaries of any parent never see it, while ``_apply`` forwards ``.to()``/``.cuda()``/``.half()`` to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["EncoderOutput", "FrozenEncoder", "center_frames", "lengths_to_mask", "level_gain"]


@dataclass
class EncoderOutput:
    """Frame states of a padded batch.

    Attributes:
        states: ``[B, T, D]`` float32 states; zero on padded frames.
        lengths: ``[B]`` long, real frames per item (``T == lengths.max()``).
        mask: ``[B, T]`` bool, True on real frames.
    """

    states: Tensor
    lengths: Tensor
    mask: Tensor


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``[B]`` lengths -> ``[B, max_len]`` bool mask, True where ``t < lengths[b]``."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def level_gain(audio: Tensor, lengths: Tensor, level_db: float) -> Tensor:
    """``[B]`` gains that bring each item's RMS over its ``lengths`` samples to ``level_db`` dBFS.

    The gain is capped at 100 (+40 dB) so that near-silent input is not blown up.
    """
    real = audio.float() * lengths_to_mask(lengths, audio.shape[1])
    rms = (real.square().sum(1) / lengths.clamp(min=1)).sqrt()
    return (10 ** (level_db / 20) / rms.clamp(min=1e-12)).clamp(max=100.0)


def center_frames(states: Tensor, mask: Tensor) -> Tensor:
    """``states [B, T, D]`` minus each item's mean over its real frames (``mask [B, T]``); pads stay 0."""
    m = mask[..., None].to(states.dtype)
    mean = (states * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    return (states - mean) * m


class FrozenEncoder(nn.Module):
    """Base class: validation, freezing, optional bf16 autocast, chunking of long audio, output assembly.

    Subclasses set ``self.kind``, ``self.source``, ``self.layer``, ``self.pooling``, store their network
    with :meth:`_set_model` (hidden from ``state_dict``), and implement :meth:`_encode` and
    :meth:`num_frames`. A subclass whose network has a fixed window (Gemma 4: the feature extractor
    stops at 30 s; Whisper: a 30 s context) sets ``self.chunk_samples``; longer audio is then cut into
    pieces of at most that many samples, each encoded alone, and the states concatenated per item, so
    nothing is truncated. ``chunk_samples`` must be a whole number of frames so pieces stay aligned.

    Two optional per-utterance normalisations (off by default; the stage-1 artifact records them,
    so tokenization and stage-3 inference apply the same ones):

    - ``level_db``: scale each item so the RMS of its samples is ``level_db`` dBFS (gain capped at
      +40 dB so near-silence is not blown up). Recordings made at different levels then give the
      same features; a pretrained encoder is robust to level anyway, a random one is not.
    - ``center_states``: subtract each item's mean state over its real frames (cepstral mean
      normalisation, on states): removes a per-recording offset (microphone, room, speaker) that a
      random-weight encoder passes straight through. It also removes what is constant over an
      utterance, so leave it off for a pretrained encoder whose states an LLM reads as they are.

    Attributes:
        sample_rate: 16000, the only rate the encoders accept (resample before, see ``datamodules``).
        dim: width ``D`` of the states.
        frame_rate: frames per second of the states.
    """

    sample_rate: int = 16000

    def __init__(
        self, *, dtype: Literal["fp32", "bf16"] = "fp32", level_db: float | None = None, center_states: bool = False
    ) -> None:
        super().__init__()
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
        if level_db is not None and not -80.0 <= level_db <= 0.0:
            raise ValueError(f"level_db must be a dBFS level in [-80, 0], got {level_db}")
        self.dtype_name = dtype
        self.level_db = None if level_db is None else float(level_db)
        self.center_states = bool(center_states)
        self.kind = "frozen"
        self.source: str | None = None
        self.layer: int | str | None = None
        self.pooling = 1
        self.chunk_samples: int | None = None
        object.__setattr__(self, "_model", None)
        super().train(False)

    # ---- the hidden network ----------------------------------------------------------------------
    def _set_model(self, model: nn.Module | None) -> None:
        """Store ``model`` frozen and unregistered (so it never enters a parent's ``state_dict``)."""
        if model is not None:
            model.requires_grad_(False)
            model.eval()
        object.__setattr__(self, "_model", model)

    @property
    def model(self) -> nn.Module | None:
        """The wrapped (frozen, unregistered) network, or None for weight-free encoders."""
        return self._model

    def _apply(self, fn: Callable, recurse: bool = True) -> FrozenEncoder:
        # .to()/.cuda()/.half() reach modules through _apply; forward it to the hidden network too.
        super()._apply(fn, recurse)
        if self._model is not None:
            self._model._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever ``mode`` says: dropout or batch statistics would change the targets."""
        super().train(False)
        if self._model is not None:
            self._model.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Device the encoder computes on (that of the hidden network's first parameter or buffer)."""
        for t in self._tensors():
            return t.device
        return torch.device("cpu")

    @property
    def model_dtype(self) -> torch.dtype:
        """Floating dtype of the hidden network's weights (float32 unless a parent cast it)."""
        for t in self._tensors():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def _autocast(self) -> torch.autocast:
        """bf16 autocast around the network when ``dtype="bf16"`` (feature extraction stays float32)."""
        device = self.device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=self.dtype_name == "bf16")

    def _tensors(self):
        if self._model is not None:
            yield from self._model.parameters()
        yield from self.buffers()

    # ---- interface -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def frame_rate(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What later stages compare to detect an encoder mismatch (all JSON-serialisable).

        Returns:
            ``{"kind", "source", "dim", "frame_rate", "layer", "pooling", "sample_rate"}``; ``source``
            is the hub id or folder the weights come from (None for config-built random weights).
        """
        return {
            "kind": self.kind,
            "source": self.source,
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "layer": self.layer,
            "pooling": self.pooling,
            "sample_rate": self.sample_rate,
            # Only when set, so artifacts written before these options existed still match.
            **({"level_db": self.level_db} if self.level_db is not None else {}),
            **({"center_states": True} if self.center_states else {}),
        }

    def num_frames(self, num_samples: Tensor) -> Tensor:
        """Frames the encoder returns for audio of ``num_samples`` samples (without running it).

        Args:
            num_samples: ``[B]`` integer sample counts.

        Returns:
            ``[B]`` long frame counts; equal to ``forward(...).lengths``.
        """
        raise NotImplementedError

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode one padded batch whose items fit the network's window.

        Args:
            audio: ``[B, N]`` float32 audio on ``self.device``.
            lengths: ``[B]`` long sample counts (``<= N``).

        Returns:
            ``states [B, T, D]`` (any float dtype) and ``lengths [B]`` long frame counts. Run the
            network under ``self._autocast()``.
        """
        raise NotImplementedError

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        """Encode a padded batch of 16 kHz mono audio.

        Args:
            audio: ``[B, N]`` float waveform in [-1, 1] at 16 kHz; samples past an item's length are
                ignored (zeroed).
            lengths: ``[B]`` long, real samples per item (default: all ``N``).

        Returns:
            :class:`EncoderOutput` with ``states [B, T, D]`` float32, ``lengths [B]`` and ``mask [B, T]``.

        Raises:
            ValueError: on a wrong shape, an empty item, a length past ``N`` or non-finite audio.
        """
        audio, lengths = self._check_inputs(audio, lengths)
        device = self.device
        audio, lengths = audio.to(device=device, dtype=torch.float32), lengths.to(device)
        # Whatever lies past an item's length must not leak into its frames (padding need not be zeros).
        audio = audio * lengths_to_mask(lengths, audio.shape[1])
        if self.level_db is not None:
            audio = audio * level_gain(audio, lengths, self.level_db)[:, None]
        with torch.no_grad():
            if self.chunk_samples is None or int(lengths.max()) <= self.chunk_samples:
                states, frames = self._encode(audio, lengths)
            else:
                states, frames = self._encode_chunked(audio, lengths)
        frames = frames.long().to(states.device)
        states = states[:, : int(frames.max())].float()
        mask = lengths_to_mask(frames, states.shape[1])
        states = states.masked_fill(~mask[..., None], 0.0)
        if self.center_states:
            states = center_frames(states, mask)
        return EncoderOutput(states=states, lengths=frames, mask=mask)

    def _check_inputs(self, audio: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        if audio.dim() != 2 or not audio.is_floating_point():
            raise ValueError(f"audio must be a float tensor [B, N], got {tuple(audio.shape)} {audio.dtype}")
        batch, n = audio.shape
        if lengths is None:
            lengths = torch.full((batch,), n, dtype=torch.long, device=audio.device)
        lengths = torch.as_tensor(lengths, device=audio.device).long()
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must be [B]={batch}, got {tuple(lengths.shape)}")
        if batch == 0 or int(lengths.min()) < 1 or int(lengths.max()) > n:
            raise ValueError(f"lengths must lie in [1, N={n}] (no empty items), got {lengths.tolist()}")
        if not bool(torch.isfinite(audio).all()):
            raise ValueError("audio contains NaN or inf")
        return audio, lengths

    def _encode_chunked(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode items longer than ``chunk_samples`` piece by piece; concatenate the pieces per item."""
        size = self.chunk_samples
        assert size is not None
        pieces: list[tuple[int, int, int]] = []  # (item, start sample, piece length), in time order
        for b, n in enumerate(lengths.tolist()):
            pieces += [(b, s, min(size, n - s)) for s in range(0, n, size)]
        # Longest first, in groups of B: similar lengths share a call (little padding), and one call
        # holds about as much audio as the input batch.
        order = sorted(range(len(pieces)), key=lambda i: -pieces[i][2])
        group = max(1, audio.shape[0])
        encoded: dict[int, Tensor] = {}
        for g in range(0, len(order), group):
            ids = order[g : g + group]
            piece_audio = audio.new_zeros(len(ids), pieces[ids[0]][2])
            for row, i in enumerate(ids):
                b, s, n = pieces[i]
                piece_audio[row, :n] = audio[b, s : s + n]
            piece_lengths = torch.tensor([pieces[i][2] for i in ids], device=audio.device)
            states, frames = self._encode(piece_audio, piece_lengths)
            for row, i in enumerate(ids):
                encoded[i] = states[row, : int(frames[row])]
        per_item: list[list[Tensor]] = [[] for _ in range(audio.shape[0])]
        for i, (b, _, _) in enumerate(pieces):
            per_item[b].append(encoded[i])
        items = [torch.cat(parts, dim=0) for parts in per_item]
        frames = torch.tensor([x.shape[0] for x in items], device=audio.device)
        return nn.utils.rnn.pad_sequence(items, batch_first=True), frames

    def extra_repr(self) -> str:
        d = self.describe()
        return ", ".join(f"{k}={d[k]!r}" for k in ("source", "dim", "frame_rate", "layer")) + (
            f", dtype={self.dtype_name!r}"
        )
