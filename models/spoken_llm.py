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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoTokenizer

from models.chat_format import IGNORE_INDEX, end_of_turn_id
from models.codec import frame_token_names
from models.ctc import segment_ctc
from models.projector import AudioProjector
from models.sound_tokens import SoundTokens
from models.spoken_llm_audio import AudioPaths
from models.spoken_llm_prompts import PromptsAndGeneration
from models.spoken_llm_state import DTYPES, TrainableState
from models.spoken_llm_teacher import TextTeacher

__all__ = ["AUDIO_PLACEHOLDERS", "DEFAULT_LORA_TARGETS", "SpokenLLM", "default_sound_tokens"]

# Attention and MLP projections of the language model only: the audio/vision towers keep their weights.
DEFAULT_LORA_TARGETS = (
    r"^(?!.*(?:audio_tower|vision_tower|embed_audio|embed_vision)).*"
    r"\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)

_DTYPES = DTYPES

#: The projector path's audio block in a text LLM's prompt: start, slot (replaced), end. Added to the
#: vocabulary as special tokens when missing (so ``skip_special_tokens`` drops them from answers).
AUDIO_PLACEHOLDERS = ("<|audio_start|>", "<|audio|>", "<|audio_end|>")


def default_sound_tokens(codebook_size: int, num_levels: int = 1) -> list[str]:
    """Ichigo's token strings: ``<|sound_start|>``, ``<|sound_end|>``, ``<|sound_0000|>``.., then ``<|sound_l1_0000|>``.."""
    return frame_token_names(codebook_size, num_levels=num_levels)


class SpokenLLM(AudioPaths, PromptsAndGeneration, TrainableState, TextTeacher, nn.Module):
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
            ``ctc`` when enabled, ``logits`` [B, L, V] when asked; ``response_logits`` [n, V] and
            ``response_targets`` [n] at the n labelled tokens, row-major (what a text teacher distils).
        """
        inputs, audio_positions = self._inputs(batch)
        hidden = self.base.model(**inputs, use_cache=False, return_dict=True).last_hidden_state  # [B, L, H]
        labels = batch["labels"].to(self.device)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # [B, L-1]
        n_tokens = keep.sum()
        logits = self._logits(hidden[:, :-1][keep])  # only labelled positions: the vocabulary is large
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_tokens.clamp(min=1)
        out = {"ce": ce, "n_tokens": n_tokens, "loss": ce, "response_logits": logits, "response_targets": targets[keep]}
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
