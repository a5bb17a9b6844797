"""Stage 3: an LLM + LoRA answering spoken instructions (plain torch + transformers + peft).

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417), stage 3, with three ways of
giving the LLM the semantic tokens:

- ``input_mode="embeddings"``, native audio path (``audio_path="native"``, what ``"auto"`` picks for
  Gemma 4): the RVQ reconstructs the Gemma 4 audio encoder's own pre-projection space, so codes
  [N, Q, T] -> ``rvq.decode`` -> states [N, T, D] -> the model's own ``audio_tower.output_proj`` ->
  ``embed_audio`` -> the ``<|audio|>`` slots of the prompt, exactly where ``Gemma4Model`` scatters real
  audio. Real speech at inference takes the audio tower up to ``output_proj`` (optionally through the
  RVQ round trip it was trained with) and then the same path.
- ``input_mode="embeddings"``, trainable projector (``audio_path="projector"``, what ``"auto"`` picks
  for an LLM without an audio tower: Gemma 3, Llama, a Gemma 4 text model): states of *any* stage-1
  encoder (Whisper, HuBERT, Gemma 4's) -> ``models.projector.AudioProjector`` (k frames stacked, a
  two-layer MLP, as Ultravox / SLAM-LLM) -> ``ceil(T / k)`` placeholder slots of the prompt, written
  in the user turn as ``<|audio_start|>`` + n x ``<|audio|>`` + ``<|audio_end|>`` (tokens added to the
  vocabulary as special tokens, their rows trained like sound tokens; a tokenizer with Gemma 4's own
  audio tokens uses those) and replaced via ``inputs_embeds``. Training reads the RVQ-decoded states
  of the synthetic codes; real speech goes through the attached frozen stage-1 encoder
  (``attach_encoder``), optionally through the RVQ round trip (``rvq_round_trip``), then the projector.
- ``input_mode="tokens"``: Ichigo-style sound tokens (``<|sound_0123|>``) added to the vocabulary of
  any causal LM (Gemma 3, Llama, ...); the new embedding rows are trained with peft's
  ``trainable_token_indices`` (a sparse delta on the frozen embedding, tied to ``lm_head``), the rest
  of the vocabulary stays frozen. Codes [Q, T] become prompt text (``example``): the first
  ``sound_levels`` levels frame by frame, levels interleaved (``models.sound_tokens``; 1 = Ichigo's
  level-0 string). Real speech goes through the frozen stage-1 encoder and RVQ (``attach_encoder``)
  to the same text, so the LLM needs no audio tower.

Only LoRA (plus the new token rows, plus the projector or ``embed_audio`` when asked) trains. An
optional CTC loss through the frozen ``lm_head`` on the audio positions (the DiffusionGemma ASR trick)
pushes a frozen backbone to read the audio; ``ctc_weight`` > 0 enables it. The audio positions are the
audio slots (embeddings) or the sound tokens (tokens mode); the targets are the instruction's text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer

from models.chat_format import IGNORE_INDEX, build_example, build_prompt, collate_padded, end_of_turn_id
from models.codec import frame_token_names
from models.ctc import segment_ctc
from models.encoders.base import center_frames, level_gain
from models.peft_export import export_merged
from models.projector import AudioProjector
from models.sound_tokens import SoundTokens, speech_to_codes

__all__ = ["AUDIO_PLACEHOLDERS", "DEFAULT_LORA_TARGETS", "SpokenLLM", "default_sound_tokens"]

# Attention and MLP projections of the language model only: the audio/vision towers keep their weights.
DEFAULT_LORA_TARGETS = (
    r"^(?!.*(?:audio_tower|vision_tower|embed_audio|embed_vision)).*"
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: The projector path's audio block in a text LLM's prompt: start, slot (replaced), end. Added to the
#: vocabulary as special tokens when missing (so ``skip_special_tokens`` drops them from answers).
AUDIO_PLACEHOLDERS = ("<|audio_start|>", "<|audio|>", "<|audio_end|>")


def default_sound_tokens(codebook_size: int, num_levels: int = 1) -> list[str]:
    """Ichigo's token strings: ``<|sound_start|>``, ``<|sound_end|>``, ``<|sound_0000|>``.., then ``<|sound_l1_0000|>``.."""
    return frame_token_names(codebook_size, num_levels=num_levels)


def _frozen(module: nn.Module) -> tuple[nn.Module]:
    """``module`` frozen, in eval mode, inside a tuple: hidden from ``parameters()`` and ``state_dict()``."""
    module.requires_grad_(False)
    module.eval()
    return (module,)


class SpokenLLM(nn.Module):
    """A causal LM (Gemma 4 by default) with LoRA that reads spoken instructions.

    Args:
        model: Hub id or local folder (``google/gemma-4-E4B-it``; tests use ``demo.tiny.save_gemma4_llm_debug``).
        input_mode: ``"embeddings"`` (decoded states through an audio path) or ``"tokens"`` (sound tokens).
        audio_path: Embeddings mode: ``"native"`` (Gemma 4's ``output_proj`` + ``embed_audio``: states of
            its own audio encoder), ``"projector"`` (a trainable ``AudioProjector``: states of any
            encoder, any causal LM) or ``"auto"`` (native when the model has an audio tower, else projector).
        audio_dim: Projector path: width ``D`` of the stage-1 encoder states (the stage-1 RVQ's ``dim``).
        projector_stack: Projector path: consecutive encoder frames per LLM position (``k``).
        projector_hidden: Projector path: width of the MLP's hidden layer (default: the LLM's width).
        projector_activation: Projector path: ``"gelu"`` or ``"silu"``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Module-name regex (full match) or list of names for LoRA.
        dtype: Weights dtype, ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        gradient_checkpointing: Recompute activations in the backward pass.
        num_levels: RVQ levels Q the codes must have.
        codebook_size: Entries per codebook K; codes must lie in ``[0, K)``.
        sound_tokens: Token strings added in ``tokens`` mode (default: all that ``sound_levels`` and
            ``sound_compress`` write; a custom list must include those).
        sound_levels: ``tokens`` mode: leading RVQ levels written per frame (1: Ichigo's level-0 tokens,
            ``num_levels``: all, levels interleaved per frame).
        sound_compress: ``tokens`` mode: run-length compress identical frames with ``<|duration_nn|>``.
        ctc_weight: Weight of the CTC loss on the audio positions (batches with audio then need
            ``ctc_targets``, which ``InstructionDataModule`` supplies when bound with ``ctc_targets``).
        train_audio_embedder: Also train ``embed_audio`` (saved with the adapter as a peft module to save).
        attn_implementation: Passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).
    """

    def __init__(
        self,
        *,
        model: str,
        input_mode: Literal["embeddings", "tokens"] = "embeddings",
        audio_path: Literal["auto", "native", "projector"] = "auto",
        audio_dim: int | None = None,
        projector_stack: int = 4,
        projector_hidden: int | None = None,
        projector_activation: Literal["gelu", "silu"] = "gelu",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = DEFAULT_LORA_TARGETS,
        dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
        gradient_checkpointing: bool = False,
        num_levels: int = 8,
        codebook_size: int = 2048,
        sound_tokens: list[str] | None = None,
        sound_levels: int = 1,
        sound_compress: bool = False,
        ctc_weight: float = 0.0,
        train_audio_embedder: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        if input_mode not in ("embeddings", "tokens"):
            raise ValueError(f"input_mode must be 'embeddings' or 'tokens', got {input_mode!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if audio_path not in ("auto", "native", "projector"):
            raise ValueError(f"audio_path must be 'auto', 'native' or 'projector', got {audio_path!r}")
        if input_mode == "tokens" and audio_path != "auto":
            raise ValueError(f"audio_path={audio_path!r} is an embeddings-mode option; tokens mode has no audio path")
        self.model_name = str(model)
        self.input_mode = input_mode
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.ctc_weight = float(ctc_weight)
        self.torch_dtype = _DTYPES[dtype]
        self._load_kwargs = {"dtype": self.torch_dtype}
        if attn_implementation:
            self._load_kwargs["attn_implementation"] = attn_implementation
        # A tuple hides the frozen RVQ from parameters() and state_dict(): it is never trained or saved here.
        self._rvq: tuple[nn.Module, ...] = ()
        self._encoder: tuple[nn.Module, ...] = ()  # tokens mode: the frozen stage-1 encoder, likewise hidden
        self.sound = SoundTokens(
            codebook_size=codebook_size, num_levels=num_levels, levels=sound_levels, compress=sound_compress
        )
        # The stage-1 encoder's per-utterance normalisation, applied to real audio (set_audio_normalization).
        self.level_db: float | None = None
        self.center_states = False
        self._feature_extractor = None

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        base = AutoModelForCausalLM.from_pretrained(self.model_name, **self._load_kwargs)
        base.requires_grad_(False)
        self.new_token_ids: list[int] = []
        trainable_ids: list[int] = []  # embedding rows trained through peft's trainable_token_indices
        # Embeddings mode: "native" or "projector"; tokens mode: None.
        self.audio_path = None if input_mode == "tokens" else audio_path
        self.projector: AudioProjector | None = None
        self._placeholders: tuple[str, str, str] | None = None
        if input_mode == "tokens":
            self.new_token_ids = trainable_ids = self._add_tokens(base, sound_tokens or self.sound.token_names())
            absent = [t for t in self.sound.token_names() if t not in self.tokenizer.get_vocab()]
            if absent:
                raise ValueError(f"sound_tokens lacks {len(absent)} tokens the prompts use, e.g. {absent[:3]}")
        else:
            if audio_path == "auto":
                self.audio_path = "native" if self._has_audio_path(base) else "projector"
            if self.audio_path == "native" and not self._has_audio_path(base):
                raise ValueError(f"{self.model_name} has no audio tower/embedder: use audio_path='projector' "
                                 "(a trainable projector) or input_mode='tokens'")  # fmt: skip
            if self.audio_path == "projector":
                if audio_dim is None:
                    raise ValueError(f"{self.model_name} hears audio through a trainable projector here: give "
                                     "audio_dim, the stage-1 encoder's state width (the RVQ's dim)")  # fmt: skip
                if train_audio_embedder:
                    raise ValueError("train_audio_embedder trains Gemma 4's embed_audio: the projector path skips it")
                self._placeholders, trainable_ids = self._placeholder_tokens(base)
                self.projector = AudioProjector(
                    input_dim=audio_dim, output_dim=base.config.get_text_config().hidden_size,
                    stack=projector_stack, hidden_dim=projector_hidden, activation=projector_activation,
                )  # fmt: skip
        if gradient_checkpointing:
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
                base.activation_checkpointing_enable({"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_target_modules,
            trainable_token_indices={"embed_tokens": trainable_ids} if trainable_ids else None,
            modules_to_save=["embed_audio"] if train_audio_embedder else None,
            task_type="CAUSAL_LM",
        )
        self.peft_model = get_peft_model(base, lora_config)
        self.pad_id = self._text_config().pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = sorted({end_of_turn_id(self.tokenizer)} | ({self.tokenizer.eos_token_id} - {None}))

    # ----------------------------------------------------------------------------------------- setup
    @property
    def base(self) -> nn.Module:
        """The underlying transformers model, LoRA layers injected (a property: no second state_dict prefix)."""
        return self.peft_model.get_base_model()

    def _text_config(self):
        return self.base.config.get_text_config()

    @staticmethod
    def _has_audio_path(base: nn.Module) -> bool:
        inner = getattr(base, "model", None)
        return (
            getattr(inner, "audio_tower", None) is not None
            and getattr(inner, "embed_audio", None) is not None
        )

    def _add_tokens(self, base: nn.Module, tokens: Sequence[str], *, special: bool = False) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=special)
        ids = self.tokenizer.convert_tokens_to_ids(list(tokens))
        if len(self.tokenizer) > base.get_input_embeddings().num_embeddings:
            # Mean-initialised rows (transformers' default) start the new tokens inside the embedding cloud.
            base.resize_token_embeddings(len(self.tokenizer))
        return sorted(set(ids))

    def _placeholder_tokens(self, base: nn.Module) -> tuple[tuple[str, str, str], list[int]]:
        """The projector path's (start, slot, end) tokens and the embedding rows to train.

        A tokenizer with Gemma 4's audio tokens keeps them (pretrained rows, nothing to train); any
        other gets :data:`AUDIO_PLACEHOLDERS` as special tokens. Their rows train (start/end are what
        the LLM reads around the audio; the slot's row is only ever seen by ``lm_head``, where training
        keeps it from being generated), and being trained they are saved with the adapter, so a
        reloaded model has exactly these rows instead of freshly sampled ones.
        """
        own = tuple(getattr(self.tokenizer, n, None) for n in ("boa_token", "audio_token", "eoa_token"))
        if all(own) and all(t in self.tokenizer.get_vocab() for t in own):
            return own, []  # type: ignore[return-value]
        return AUDIO_PLACEHOLDERS, self._add_tokens(base, AUDIO_PLACEHOLDERS, special=True)

    def attach_rvq(self, rvq: nn.Module) -> None:
        """Attach the frozen stage-1 RVQ (``decode(codes [B, Q, T]) -> [B, T, D]``); never trained or saved."""
        self._check_audio_dim(getattr(rvq, "dim", None), "stage-1 RVQ")
        self._rvq = _frozen(rvq)

    @property
    def rvq(self) -> nn.Module:
        return self._held(self._rvq, "no RVQ attached: call attach_rvq(rvq) before feeding codes")

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

    @property
    def audio_token_id(self) -> int:
        """Id of the audio slot token (embeddings mode): Gemma 4's ``<|audio|>`` or the projector's placeholder."""
        if self._placeholders is not None:
            return int(self.tokenizer.convert_tokens_to_ids(self._placeholders[1]))
        return int(self.base.config.audio_token_id)

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    @property
    def feature_extractor(self):
        if self._feature_extractor is None:
            self._feature_extractor = AutoFeatureExtractor.from_pretrained(self.model_name)
        return self._feature_extractor

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

    # --------------------------------------------------------------------------------- LLM inputs
    def _inputs(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Token ids + audio -> model kwargs (``inputs_embeds`` etc.) and the audio mask [B, L]."""
        input_ids = batch["input_ids"].to(self.device)
        kwargs: dict[str, Any] = {}
        for key in ("attention_mask", "position_ids"):
            if batch.get(key) is not None:
                kwargs[key] = batch[key].to(self.device)
        if self.input_mode == "tokens":
            if batch.get("codes") is not None or batch.get("input_features") is not None:
                raise ValueError(
                    "tokens mode takes sound tokens in input_ids, not codes or audio features: build examples "
                    "with SpokenLLM.example(codes=...) and prompts with prompts_from_audio"
                )
            # The sound tokens are the audio positions (CTC reads them); one contiguous run per utterance.
            sound = torch.isin(input_ids, torch.tensor(self.new_token_ids, device=input_ids.device))
            return {"input_ids": input_ids, **kwargs}, sound

        audio_id = self.audio_token_id
        positions = batch.get("audio_positions")
        positions = (input_ids == audio_id) if positions is None else positions.to(self.device).bool()
        audio = self._audio_embeddings(batch)
        n_slots = int(positions.sum())
        if (audio is None and n_slots) or (audio is not None and audio.shape[0] != n_slots):
            got = 0 if audio is None else audio.shape[0]
            raise ValueError(f"{n_slots} audio slots in input_ids but {got} audio frames given")
        ids = input_ids.masked_fill(positions, self.pad_id)
        embeds = self.base.get_input_embeddings()(ids)  # [B, L, H]
        if getattr(self._text_config(), "hidden_size_per_layer_input", None):
            # Gemma 4's per-layer embeddings see the pad token at audio slots, as in Gemma4Model.forward.
            kwargs["per_layer_inputs"] = self.base.model.language_model.get_per_layer_inputs(ids, embeds)
        if audio is not None:
            embeds = embeds.masked_scatter(positions[..., None].expand_as(embeds), audio.to(embeds.dtype))
        return {"inputs_embeds": embeds, **kwargs}, positions

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base.get_output_embeddings()(hidden)
        cap = getattr(self._text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # ------------------------------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any], *, return_logits: bool = False) -> dict[str, torch.Tensor]:
        """Loss on the response tokens (+ optional CTC on audio positions).

        Args:
            batch: ``input_ids`` [B, L], ``labels`` [B, L] (``IGNORE_INDEX`` off the response); either
                ``attention_mask`` [B, L] (padded) or ``position_ids`` [B, L] restarting per example (packed,
                no mask); optional ``audio_positions`` [B, L]; audio as ``codes`` [N, Q, T] (+ ``code_lengths``
                [N]) or ``input_features`` [N, F, 128] + ``input_features_mask`` [N, F], N = audio segments
                in row-major order; for CTC ``ctc_targets`` [N, S] (transcript ids, padded with ``IGNORE_INDEX``).
            return_logits: Also return the full logits [B, L, V].

        Returns:
            ``loss`` (scalar: ``ce`` + ``ctc_weight`` x ``ctc``), ``ce``, ``n_tokens`` (labelled tokens),
            ``ctc`` when enabled, ``logits`` [B, L, V] when asked.
        """
        inputs, audio_positions = self._inputs(batch)
        hidden = self.base.model(**inputs, use_cache=False, return_dict=True).last_hidden_state  # [B, L, H]
        labels = batch["labels"].to(self.device)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # [B, L-1]
        n_tokens = keep.sum()
        logits = self._logits(hidden[:, :-1][keep])  # only labelled positions: the vocabulary is large
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_tokens.clamp(min=1)
        out = {"ce": ce, "n_tokens": n_tokens, "loss": ce}
        if self.ctc_weight > 0 and audio_positions is not None and bool(audio_positions.any()):
            if batch.get("ctc_targets") is None:
                raise ValueError(
                    "ctc_weight > 0 but the batch has audio and no ctc_targets: bind the datamodule with "
                    "ctc_targets (SpokenInstructionStage does when ctc_weight > 0) or set ctc_weight: 0"
                )
            out["ctc"] = self._ctc(hidden, audio_positions, batch["ctc_targets"].to(self.device))
            out["loss"] = ce + self.ctc_weight * out["ctc"]
        if return_logits:
            out["logits"] = self._logits(hidden)
        return out

    def _ctc(self, hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CTC of each audio segment's final hidden states through the frozen ``lm_head`` (blank = pad)."""
        return segment_ctc(hidden, positions, targets, logits=self._logits, blank=self.pad_id)

    # --------------------------------------------------------------------------------- examples
    def example(
        self, *, instruction_text: str | None, codes: torch.Tensor | None, response: str
    ) -> dict[str, torch.Tensor]:
        """One training example in this model's input mode (what ``InstructionDataModule.bind`` takes).

        Args:
            instruction_text: Text of the user turn (before the audio), or ``None``.
            codes: ``[Q, T]`` codes of a spoken instruction, or ``None`` for a text-only one.
            response: The answer.

        Returns:
            ``build_example``'s dict; in embeddings mode spoken examples also carry ``codes`` [Q, T]
            (their audio slots), in tokens mode the codes are already sound tokens in ``input_ids``.
        """
        if codes is None:
            return build_example(self.tokenizer, instruction_text=instruction_text, audio_frames=None, response=response)
        if self.input_mode == "tokens":
            text = self._with_sound(instruction_text, self.sound.text(codes))
            return build_example(self.tokenizer, instruction_text=text, audio_frames=None, response=response)
        if self.projector is not None:
            n = self.projector.num_positions(int(codes.shape[-1]))
            text = self._with_sound(instruction_text, self._audio_block(n))
            ex = build_example(self.tokenizer, instruction_text=text, audio_frames=None, response=response)
            return {**self._mark_audio(ex, n), "codes": codes}
        ex = build_example(self.tokenizer, instruction_text=instruction_text, audio_frames=int(codes.shape[-1]), response=response)
        return {**ex, "codes": codes}

    def ctc_targets(self, text: str) -> torch.Tensor:
        """The CTC target of a spoken instruction: its text in this LLM's tokens, ``[S]`` long."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    @staticmethod
    def _with_sound(instruction_text: str | None, sound: str) -> str:
        return f"{instruction_text}\n{sound}" if instruction_text else sound

    def _audio_block(self, n: int) -> str:
        """The projector path's audio block of ``n`` slots, written into the user turn's text."""
        start, slot, end = self._placeholders  # type: ignore[misc]
        return start + slot * n + end

    def _mark_audio(self, example: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """``example`` with ``audio_positions`` at its ``n`` placeholder slots (checked: no merge, no loss)."""
        positions = example["input_ids"] == self.audio_token_id
        if int(positions.sum()) != n:
            raise ValueError(f"placed {int(positions.sum())} audio slots, expected {n}")
        return {**example, "audio_positions": positions}

    # ------------------------------------------------------------------------------------ inference
    def prompts_from_text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text (or sound-token) instructions -> a left-padded generation batch."""
        rows = [build_prompt(self.tokenizer, instruction_text=p, audio_frames=None) for p in prompts]
        return collate_padded(rows, pad_id=self.pad_id, side="left")

    def prompts_from_audio(
        self,
        waveforms: Sequence[np.ndarray],
        *,
        instruction_text: str | None = None,
        sampling_rate: int = 16_000,
        pieces_per_item: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """16 kHz mono waveforms -> a left-padded generation batch.

        Embeddings mode: Gemma 4 audio features for the audio tower (native) or the attached stage-1
        encoder's states (``audio_states`` [B, T, D], ``audio_lengths`` [B]; projector) for the projector,
        ``ceil(T / k)`` slots each. Tokens mode: the attached stage-1 encoder -> RVQ codes -> sound tokens
        in ``input_ids`` (text only, as in training). Set ``batch["rvq_round_trip"]`` for the RVQ round trip.

        Args:
            waveforms: ``[N_i]`` float arrays, each at most 30 s (the feature extractor's window).
            instruction_text: text before the audio in the user turn.
            sampling_rate: their rate (16 kHz).
            pieces_per_item: for audio longer than 30 s cut into consecutive pieces: how many
                consecutive waveforms form one prompt; their frames fill one audio block in order, so
                the whole recording is heard, never truncated. Default: one waveform per prompt.
        """
        waves = [np.asarray(w, dtype=np.float32) for w in waveforms]
        groups = list(pieces_per_item) if pieces_per_item is not None else [1] * len(waves)
        if sum(groups) != len(waves):
            raise ValueError(f"pieces_per_item sums to {sum(groups)} but {len(waves)} waveforms were given")
        starts = np.cumsum([0, *groups])
        if self.input_mode == "tokens":
            # Stage-1 encoder (its own normalisation) -> RVQ -> sound tokens; pieces of one item in order.
            codes = speech_to_codes(self.encoder, self.rvq, waves)
            rows = [
                build_prompt(self.tokenizer, audio_frames=None, instruction_text=self._with_sound(
                    instruction_text, self.sound.text(torch.cat(codes[a:b], dim=-1))))
                for a, b in zip(starts[:-1], starts[1:])
            ]  # fmt: skip
            return collate_padded(rows, pad_id=self.pad_id, side="left")
        if self.projector is not None:
            # Stage-1 encoder (its own normalisation) -> states; pieces of one item concatenated in order.
            states, lengths = self._encode_items(waves, starts)
            slots = [self.projector.num_positions(n) for n in lengths.tolist()]  # ceil(T / k) per item
            rows = [
                self._mark_audio(build_prompt(self.tokenizer, audio_frames=None, instruction_text=self._with_sound(
                    instruction_text, self._audio_block(n))), n)
                for n in slots
            ]  # fmt: skip
            batch = collate_padded(rows, pad_id=self.pad_id, side="left")
            batch.update(audio_states=states, audio_lengths=lengths)
            return batch
        if self.level_db is not None:
            waves = [w * float(level_gain(torch.from_numpy(w)[None], torch.tensor([len(w)]), self.level_db)) for w in waves]
        feats = self.feature_extractor(
            waves,
            sampling_rate=sampling_rate,
            return_tensors="pt",
        )
        _, valid = self.encoder_states(feats["input_features"], feats["input_features_mask"])
        frames = valid.sum(1).tolist()
        rows = [
            build_prompt(self.tokenizer, instruction_text=instruction_text, audio_frames=int(sum(frames[a:b])))
            for a, b in zip(starts[:-1], starts[1:])
        ]
        batch = collate_padded(rows, pad_id=self.pad_id, side="left")
        batch.update(input_features=feats["input_features"], input_features_mask=feats["input_features_mask"])
        return batch

    @torch.no_grad()
    def _encode_items(self, waves: list[np.ndarray], starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> the stage-1 encoder -> per item (consecutive pieces joined) states [B, T, D], lengths [B]."""
        encoder = self.encoder
        audio = nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
        with torch.autocast(device_type=encoder.device.type, enabled=False):  # the encoder's own dtype rules
            out = encoder(audio.to(encoder.device), torch.tensor([len(w) for w in waves], device=encoder.device))
        pieces = [out.states[i, :n] for i, n in enumerate(out.lengths.tolist())]
        items = [torch.cat(pieces[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        return nn.utils.rnn.pad_sequence(items, batch_first=True), torch.tensor([len(x) for x in items])

    @torch.no_grad()
    def generate(
        self,
        batch_or_prompts: dict[str, Any] | Sequence[str],
        max_new_tokens: int = 64,
        greedy: bool = True,
        **kwargs,
    ) -> list[str]:
        """Answer a left-padded prompt batch (see ``prompts_from_*``, ``build_prompt``) or a list of text prompts.

        Returns:
            One decoded answer per row, special tokens removed.
        """
        batch = (
            self.prompts_from_text(batch_or_prompts)
            if not isinstance(batch_or_prompts, dict)
            else batch_or_prompts
        )
        if batch["input_ids"].shape[0] > 1 and batch.get("attention_mask") is None:
            raise ValueError("batched generation needs a left-padded attention_mask")
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch.get("attention_mask")
        attention_mask = (
            torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        )
        positions, audio = None, None
        if self.input_mode == "embeddings":
            inputs, positions = self._inputs({k: v for k, v in batch.items() if k != "position_ids"})
            audio = inputs["inputs_embeds"][positions]  # [n_audio, H]
        was_training = self.training
        self.eval()
        try:
            with self._inject_audio(positions, audio):
                out = self.peft_model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_id,
                    **kwargs,
                )
        finally:
            self.train(was_training)
        out = out[:, input_ids.shape[1] :]  # generate echoes the prompt
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    @contextmanager
    def _inject_audio(self, positions: torch.Tensor | None, audio: torch.Tensor | None):
        """Write the audio embeddings into the prefill's token embeddings during ``generate``.

        Gemma 4's ``prepare_inputs_for_generation`` does not forward ``inputs_embeds``, so ``generate`` gets
        the ids (audio slots hold ``<|audio|>``, which ``Gemma4Model`` embeds as pad) and this one-shot hook
        on the embedding layer replaces those slots, once, in the prefill call.
        """
        if positions is None or audio is None or not bool(positions.any()):
            yield
            return
        done = [False]

        def hook(_module, _args, output):
            if done[0] or output.shape[:2] != positions.shape:
                return output
            done[0] = True
            return output.masked_scatter(positions[..., None].expand_as(output), audio.to(output.dtype))

        handle = self.base.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        if not done[0]:
            raise RuntimeError("generate never embedded the prompt: the audio was not injected")

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
        kwargs = {**self._load_kwargs, **({"dtype": _DTYPES[dtype]} if dtype else {})}
        return export_merged(self.peft_model, source=self.model_name, tokenizer=self.tokenizer, directory=directory, **kwargs)
