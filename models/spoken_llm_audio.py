"""``SpokenLLM``'s audio paths: the frozen stage-1 modules it holds and audio -> the LLM's embedding space.

Codes are dequantized by the attached RVQ (``embed_codes``), real speech goes through Gemma 4's audio
tower (``encoder_states``) or a stage-1 encoder's states (``embed_states``), optionally through the RVQ
round trip; each reaches the audio slots through the native ``output_proj`` + ``embed_audio`` or the
trainable projector (see ``models/spoken_llm.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.encoders.base import center_frames
from models.projector import AudioProjector

__all__ = ["AudioPaths"]


def _frozen(module: nn.Module) -> tuple[nn.Module]:
    """``module`` frozen, in eval mode, inside a tuple: hidden from ``parameters()`` and ``state_dict()``."""
    module.requires_grad_(False)
    module.eval()
    return (module,)


class AudioPaths:
    """The audio half of :class:`models.spoken_llm.SpokenLLM` (a mixin: it reads the model's attributes)."""

    def attach_rvq(self, rvq: nn.Module) -> None:
        """Attach the frozen stage-1 RVQ (``decode(codes [B, Q, T]) -> [B, T, D]``); never trained or saved."""
        self._check_audio_dim(getattr(rvq, "dim", None), "stage-1 RVQ")
        self._rvq = _frozen(rvq)

    @property
    def rvq(self) -> nn.Module:
        return self._held(self._rvq, "no RVQ attached: call attach_rvq(rvq) before feeding codes")

    def decoded_frames(self, frames: int) -> int:
        """States that ``frames`` code frames decode to: more for a tokenizer that decodes at a higher
        rate than it encodes (WhisperVQ: ``decode_upsample`` 2, 25 -> 50 frames/s), else the same."""
        held = getattr(self, "_rvq", ())
        return int(frames) * int(getattr(held[0], "decode_upsample", 1) if held else 1)

    def attach_encoder(self, encoder: nn.Module) -> None:
        """Tokens mode, projector: attach the frozen stage-1 encoder (``FrozenEncoder``) real speech goes through."""
        self._check_audio_dim(getattr(encoder, "dim", None), "stage-1 encoder")
        self._encoder = _frozen(encoder)

    @property
    def encoder(self) -> nn.Module:
        return self._held(self._encoder, f"{self.input_mode} mode ({self.audio_path or 'sound tokens'}) hears real "
                                         "speech through the stage-1 encoder: call attach_encoder")  # fmt: skip

    @property
    def hears_through_encoder(self) -> bool:
        """Whether real speech reaches the LLM through the attached stage-1 encoder (tokens mode, projector)."""
        return self.input_mode == "tokens" or self.audio_path == "projector"

    def _check_audio_dim(self, dim: int | None, what: str) -> None:
        if self.projector is not None and dim is not None and int(dim) != self.projector.input_dim:
            raise ValueError(f"the {what} gives {dim}-dim states but the projector reads {self.projector.input_dim}: "
                             f"set llm.init_args.audio_dim: {dim}")  # fmt: skip

    def load_projector(self, projector: AudioProjector) -> None:
        """Copy a trained projector's weights (``AudioProjector.load`` of a saved adapter) into this one.

        Raises:
            ValueError: Without a projector here, or when the two were built with other sizes.
        """
        if self.projector is None:
            raise ValueError(f"{self.model_name} in {self.input_mode} mode ({self.audio_path}) has no projector")
        if projector.config() != self.projector.config():
            raise ValueError(f"saved projector {projector.config()} != this model's {self.projector.config()}")
        self.projector.load_state_dict(projector.state_dict())

    def _held(self, held: tuple[nn.Module, ...], missing: str) -> nn.Module:
        """An attached frozen module, moved to this model's device on first use there."""
        if not held:
            raise RuntimeError(missing)
        module = held[0]
        tensor = next(iter(module.parameters()), None)
        tensor = next(iter(module.buffers()), None) if tensor is None else tensor
        if tensor is not None and tensor.device != self.device:
            module.to(self.device)
        return module

    def set_audio_normalization(self, *, level_db: float | None = None, center_states: bool = False) -> None:
        """Apply the stage-1 encoder's per-utterance normalisation to real audio (see ``FrozenEncoder``).

        The RVQ was fit on states made this way, so real speech must be made the same way before the
        round trip. Audio cut into pieces (over 30 s) is normalised piece by piece.
        """
        self.level_db = None if level_db is None else float(level_db)
        self.center_states = bool(center_states)


    # ------------------------------------------------------------------------------- audio → LLM space
    def project_states(self, states: torch.Tensor) -> torch.Tensor:
        """Encoder-space states [..., D] -> Gemma 4 ``output_proj`` -> ``embed_audio`` -> [..., H]."""
        inner = self.base.model
        proj = inner.audio_tower.output_proj
        return inner.embed_audio(inputs_embeds=proj(states.to(proj.weight.dtype)))

    def _embed_valid(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """States [N, T, D] with a validity mask [N, T] -> the audio slots' embeddings, by audio path.

        Native: one slot per valid frame. Projector: ``ceil(T_i / k)`` slots per segment, its valid
        frames (a prefix) stacked k by k.
        """
        valid = valid.to(states.device)
        if states.shape[1] != valid.shape[1] and states.shape[1] == self.decoded_frames(valid.shape[1]):
            valid = valid.repeat_interleave(states.shape[1] // valid.shape[1], dim=1)  # decoded at a higher rate
        if self.projector is None:
            return self.project_states(states)[valid]
        lengths = valid.sum(1)
        if not torch.equal(valid, torch.arange(valid.shape[1], device=valid.device)[None] < lengths[:, None]):
            raise ValueError("the projector stacks consecutive frames: each segment's valid frames must be a prefix")
        embeds, groups = self.projector(states.to(self.device), lengths.to(self.device))  # [N, T', H], [N]
        return embeds[torch.arange(embeds.shape[1], device=self.device)[None] < groups[:, None]]

    def embed_states(
        self, states: torch.Tensor, lengths: torch.Tensor, *, rvq_round_trip: bool = False
    ) -> torch.Tensor:
        """Stage-1 encoder states -> (RVQ encode/decode, as in training) -> the audio slots' embeddings.

        Args:
            states: [N, T, D] states of the stage-1 encoder (``FrozenEncoder`` output), padded.
            lengths: [N] valid frames per segment.
            rvq_round_trip: Quantize and dequantize with the attached RVQ first.

        Returns:
            [n_slots, H] in segment order (one slot per frame natively, ``ceil(T_i / k)`` with the projector).
        """
        valid = torch.arange(states.shape[1], device=states.device)[None] < lengths.to(states.device)[:, None]
        if self.projector is not None and states.shape[-1] != self.projector.input_dim:
            self._check_audio_dim(states.shape[-1], "stage-1 encoder")
        if rvq_round_trip:
            states = self._round_trip(states.to(self.device), valid.to(self.device))
        elif self.decoded_frames(1) != 1:
            raise ValueError("the stage-1 tokenizer decodes at another frame rate than its encoder's (WhisperVQ), "
                             "which is what stage 3 was trained on: real speech needs rvq_round_trip")
        return self._embed_valid(states.to(self.device), valid)

    def _round_trip(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Outside any caller's autocast: a bf16 nearest-code search would pick other codes than stage 1 did.
        with torch.no_grad(), torch.autocast(device_type=states.device.type, enabled=False):
            codes = self.rvq.encode(states.float(), valid)
            codes = getattr(codes, "codes", codes)  # a result object or the codes tensor [N, Q, T]
            return self.rvq.decode(codes.clamp_min(0))  # padded frames (-1) are dropped by the caller

    def embed_codes(self, codes: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codes -> audio embeddings of the valid frames, segment by segment.

        Args:
            codes: [N, Q, T] long; frames past ``lengths`` may hold the RVQ's pad code ``-1``.
            lengths: [N] valid frames per segment; ``None`` means frames whose first level is ``>= 0``.

        Returns:
            [n_slots, H] in segment order: what fills the audio slots (one per valid frame natively,
            ``ceil(T_i / k)`` per segment with the projector).
        """
        if codes.ndim != 3 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must be [N, {self.num_levels}, T], got {tuple(codes.shape)}")
        n, _, t = codes.shape
        if lengths is None:
            valid = codes[:, 0] >= 0  # [N, T]
        else:
            valid = torch.arange(t, device=codes.device)[None] < lengths.to(codes.device)[:, None]
        used = codes.transpose(1, 2)[valid]  # [n_valid, Q]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.codebook_size):
            raise ValueError(
                f"valid codes outside [0, {self.codebook_size}): min {int(used.min())}, max {int(used.max())}"
            )
        with torch.no_grad():
            states = self.rvq.decode(codes.clamp_min(0).to(self.device))  # [N, T, D]; pads dropped below
        return self._embed_valid(states, valid)

    def encoder_states(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Real audio through the frozen Gemma 4 audio tower up to (not through) ``output_proj``.

        Args:
            input_features: Log-mel features [N, F, 128] from the feature extractor.
            input_features_mask: [N, F], True/1 on real frames.

        Returns:
            Pre-projection states [N, T, D] (25 frames/s) and their validity mask [N, T] (bool).
        """
        tower = self.base.model.audio_tower
        captured: list[torch.Tensor] = []
        hook = tower.output_proj.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        try:
            with torch.no_grad():
                out = tower(
                    input_features.to(self.device, self.torch_dtype),
                    input_features_mask.to(self.device).bool(),
                )
        finally:
            hook.remove()
        valid = out.attention_mask.bool()
        return (center_frames(captured[0], valid) if self.center_states else captured[0]), valid

    def embed_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor, *, rvq_round_trip: bool = False
    ) -> torch.Tensor:
        """Real audio -> audio tower -> (RVQ encode/decode, as in training) -> projection: [n_valid, H]."""
        states, valid = self.encoder_states(input_features, input_features_mask)
        if rvq_round_trip:
            states = self._round_trip(states, valid)
        return self.project_states(states)[valid]

    def _audio_embeddings(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if batch.get("codes") is not None:
            return self.embed_codes(batch["codes"], batch.get("code_lengths"))
        if batch.get("audio_states") is not None:
            return self.embed_states(batch["audio_states"], batch["audio_lengths"],
                                     rvq_round_trip=batch.get("rvq_round_trip", False))  # fmt: skip
        if batch.get("input_features") is not None:
            if self.projector is not None:
                raise ValueError("the projector path hears stage-1 encoder states (audio_states, see "
                                 "prompts_from_audio), not Gemma 4 audio features")  # fmt: skip
            return self.embed_features(
                batch["input_features"],
                batch["input_features_mask"],
                rvq_round_trip=batch.get("rvq_round_trip", False),
            )
        return None
