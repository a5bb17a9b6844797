"""Stage 2: a decoder-only LM that writes semantic tokens (RVQ codes) for a text.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417) and Ichigo (arXiv:2410.15316):
the prompt is the raw text in the chat template's user turn, the answer is the utterance's
semantic tokens, and decoding is greedy by default. Two output forms, each in its own module with
its embedding, heads and decode loop:

- ``one_level`` (:mod:`models.speech_lm_one_level`): Ichigo's form, level-0 codes as LM tokens
  with duration tokens for runs, ended by ``<|sound_end|>``;
- ``all_levels`` (:mod:`models.speech_lm_all_levels`, the default): one position per frame, the
  sum of ``Q`` level embeddings in and ``Q`` heads out (MusicGen's delay pattern), optionally
  length-conditioned (a length head, progress embeddings, a linear text alignment).

Both forms share one layout: prompts left-padded to ``P`` columns, answers right-padded to ``S``
columns, explicit ``position_ids`` so padding never shifts positions, and the text part always
embedded by the LM's own table (fed as ``inputs_embeds``). :meth:`SpeechLM.generate` runs the
form's manual batched decode loop over the HF ``DynamicCache``. The real default LM is ``google/gemma-3-270m``
(:data:`DEFAULT_LM`); tests build a tiny ``Gemma3ForCausalLM`` via ``demo.tiny.gemma3_lm_debug_config``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models import speech_lm_decode as decode_steps
from models.chat_format import IGNORE_INDEX
from models.kv_cache import cache_arg, cache_of
from models.speech_lm_all_levels import AllLevels
from models.speech_lm_one_level import OneLevel

__all__ = ["DEFAULT_LM", "IGNORE_INDEX", "SpeechLM"]

DEFAULT_LM = "google/gemma-3-270m"
_CONFIG_NAME = "speech_lm.json"
_WEIGHTS_NAME = "model.safetensors"
_FORMS = {form.name: form for form in (OneLevel, AllLevels)}




class SpeechLM(nn.Module):
    """Text -> semantic tokens decoder-only LM (see the module docstring for the two forms).

    What differs between the forms (their layers, answer grids, embedding, heads, decode loop) is
    the ``form`` object (:class:`OneLevel` or :class:`AllLevels`); prompts, batching, the
    teacher-forced loss, the decode steps and persistence are shared here.

    Args:
        lm: A causal LM: hub id or local path, a ``PreTrainedModel``, or a config (random init).
        tokenizer: Its tokenizer (id, path or object); needs a chat template or gets raw text.
        num_levels: ``Q`` RVQ levels (``all_levels`` form; ``one_level`` uses level 0 only).
        codebook_size: ``K`` codes per level.
        output_form: ``"one_level"`` (Ichigo token strings) or ``"all_levels"`` (summed level
            embeddings + ``Q`` heads).
        use_durations: ``one_level``: run-length compress with duration tokens.
        max_duration: Largest duration token.
        delay: ``all_levels``: MusicGen delay pattern.
        loss_on_prompt: Also train next-token prediction on the prompt (off: loss on speech only).
        length_conditioning: ``all_levels``: a length head and progress embeddings (see the module
            docstring); generation then ends each utterance at its predicted length.
        text_alignment: with ``length_conditioning``: each answer step's input also carries the
            embeddings of the text tokens a *linear* alignment puts there (the prompt's text tokens
            spread evenly over the ``T`` frames: token ``floor(s * n / T)`` of ``n``, with its two
            neighbours, projected by a zero-initialised layer), so the model is told which words
            it should be speaking instead of having to find them by attention; a read sentence's
            words come at a nearly even rate, and the neighbours cover the drift. ``False``
            (default): off.
        level_weights: ``all_levels``: ``Q`` non-negative weights of the levels' cross-entropies in
            the speech loss (normalised to sum to 1); ``None`` (default): every target counts once,
            i.e. equal weights. The fine levels of a residual quantizer carry little of what makes
            speech intelligible (on the sentence benchmark Whisper reads the decode of levels 0-3 of
            8 x 1024 nearly as well as all 8: WER 0.14 vs 0.13; levels 0-1 alone: 1.01), yet with
            equal weights they are half the loss.
        input_corruption: ``all_levels``, training only (``self.training``): the fraction of the
            answer's *input* codes (teacher forcing) replaced by uniformly random codes; targets are
            unchanged. Consecutive 25 Hz frames mostly repeat, so a teacher-forced model learns to
            copy the previous frame and, generating, loses its place in the text at its first slip
            (on the sentence benchmark a model that had memorised 41 sentences, teacher-forced
            argmax WER 0.28, generated them at WER 1.4: greedy left the real codes within 5-47
            frames). Corrupted inputs make it rely on the text, as Tacotron 2's always-on pre-net
            dropout does. ``0`` (default): off.
        scheduled_sampling: ``all_levels``, training only: the fraction of answer steps whose input
            codes are the model's *own* greedy predictions instead of the real previous codes
            (parallel scheduled sampling, Duckworth et al. 2019: one extra no-grad pass over the
            teacher-forced batch predicts every step; a random fraction of steps, all levels at
            once, is then fed those predictions, and the loss is that of the second pass against
            the real targets). Unlike ``input_corruption``'s uniform codes, these are the mistakes
            the model makes when it feeds itself, so it learns to recover from them instead of
            drifting. Costs one forward pass (no backward) per step. ``0`` (default): off.
        dtype: Weight dtype when ``lm`` is loaded from a path or id; default float32, the training
            dtype (transformers >= 5 would otherwise keep the checkpoint's, bf16 for Gemma 3, leaving
            the LM in bf16 beside float32 level tables: a dtype error under ``32-true`` and bf16
            master weights under ``bf16-mixed``).
    """

    def __init__(
        self,
        *,
        lm: str | PreTrainedModel | PretrainedConfig,
        tokenizer: str | PreTrainedTokenizerBase,
        num_levels: int = 8,
        codebook_size: int = 2048,
        output_form: Literal["one_level", "all_levels"] = "all_levels",
        use_durations: bool = True,
        max_duration: int = 49,
        delay: bool = True,
        loss_on_prompt: bool = False,
        length_conditioning: bool = False,
        text_alignment: bool = False,
        level_weights: list[float] | None = None,
        input_corruption: float = 0.0,
        scheduled_sampling: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if output_form not in ("one_level", "all_levels"):
            raise ValueError(f"output_form must be 'one_level' or 'all_levels', got {output_form!r}")
        if length_conditioning and output_form != "all_levels":
            raise ValueError("length_conditioning needs output_form='all_levels' (one position per frame)")
        if isinstance(lm, str):
            lm = AutoModelForCausalLM.from_pretrained(lm, dtype=dtype or torch.float32)
        elif isinstance(lm, PretrainedConfig):
            lm = AutoModelForCausalLM.from_config(lm)
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.lm, self.tokenizer = lm, tokenizer
        self.num_levels, self.codebook_size = num_levels, codebook_size
        self.output_form, self.use_durations, self.max_duration = output_form, use_durations, max_duration
        self.delay, self.loss_on_prompt, self.length_conditioning = delay, loss_on_prompt, length_conditioning
        if text_alignment and not length_conditioning:
            raise ValueError("text_alignment needs length_conditioning=True (the alignment spreads the text over T)")
        self.text_alignment = text_alignment
        if level_weights is not None:
            if output_form != "all_levels" or len(level_weights) != num_levels or min(level_weights) < 0 \
                    or sum(level_weights) <= 0:
                raise ValueError(f"level_weights must be {num_levels} non-negative weights (not all 0) of the "
                                 f"all_levels form, got {level_weights}")
            level_weights = [float(w) for w in level_weights]
        self.level_weights = level_weights
        if not 0.0 <= input_corruption < 1.0 or (input_corruption and output_form != "all_levels"):
            raise ValueError(f"input_corruption must be in [0, 1) and needs output_form='all_levels', "
                             f"got {input_corruption} with {output_form!r}")
        self.input_corruption = float(input_corruption)
        if not 0.0 <= scheduled_sampling <= 1.0 or (scheduled_sampling and output_form != "all_levels"):
            raise ValueError(f"scheduled_sampling must be in [0, 1] and needs output_form='all_levels', "
                             f"got {scheduled_sampling} with {output_form!r}")
        self.scheduled_sampling = float(scheduled_sampling)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        hidden = lm.config.get_text_config().hidden_size
        self.form = _FORMS[output_form]()
        self.form.build(self, hidden)

    # ----------------------------------------------------------------------------------- setup
    @classmethod
    def from_pretrained_lm(cls, path_or_id: str = DEFAULT_LM, *, tokenizer: str | None = None, **kwargs):
        """Wrap a pretrained causal LM (hub id or local path); the tokenizer defaults to the same path."""
        return cls(lm=path_or_id, tokenizer=tokenizer or path_or_id, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def eos_id(self) -> int:
        """End-of-speech id: ``<|sound_end|>`` (one_level) or per-head ``EOS = K`` (all_levels)."""
        return self.form.eos_id(self)

    # ----------------------------------------------------------------------------------- batching
    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the prompt: ``text`` as the user turn, ending with the model-turn header."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return tok(prompt, add_special_tokens=False)["input_ids"]
        return tok(text, add_special_tokens=True)["input_ids"]

    @functools.cached_property
    def _empty_prompt(self) -> list[int]:
        """The empty text's prompt (the chat template alone), tokenized once."""
        return self.prompt_ids("")

    def _text_span(self, ids: list[int]) -> tuple[int, int]:
        """``[a, b)``: the columns of ``ids`` (a prompt) that are the text, not the chat template
        (what the prompt shares with the empty text's prompt at its start and end)."""
        empty = self._empty_prompt
        a = 0
        while a < min(len(ids), len(empty)) and ids[a] == empty[a]:
            a += 1
        b = len(ids)
        while b > a and len(ids) - b < len(empty) - a and ids[b - 1] == empty[len(empty) - len(ids) + b - 1]:
            b -= 1
        return a, b

    def build_batch(
        self, texts: list[str], codes: list[torch.Tensor] | None = None, *, loss_on_prompt: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenize and pad a batch.

        Args:
            texts: ``B`` prompts.
            codes: ``B`` code arrays ``[Q, T_i]`` (int; ``one_level`` reads row 0), or ``None`` to get
                only the prompts plus the begin-of-speech step (generation prefill).
            loss_on_prompt: Override the constructor's choice for this batch.

        Returns:
            ``input_ids [B, P]`` left-padded prompts; ``answer_inputs [B, Q', S]`` right-padded
            (``Q' = 1`` for one_level, LM token ids; else per-level ids in ``[0, K + 1]``);
            ``labels [B, Q', S]`` targets, ``-100`` where ignored; ``attention_mask [B, P + S]``;
            ``position_ids [B, P + S]``; ``answer_frames [B]`` (frames per utterance) when ``codes``
            are given; and ``prompt_labels [B, P]`` when ``loss_on_prompt``.
        """
        if codes is not None and len(codes) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(codes)} code arrays")
        prompts = [self.prompt_ids(t) for t in texts]
        grids = []
        for i in range(len(texts)):
            c = None
            if codes is not None:
                c = torch.as_tensor(codes[i], dtype=torch.long)
                need = self.form.rows(self)
                if c.ndim != 2 or c.shape[0] < need:
                    raise ValueError(f"codes[{i}] must be [Q>={need}, T], got {tuple(c.shape)}")
                if c.numel() and (c.min() < 0 or c.max() >= self.codebook_size):
                    raise ValueError(f"codes[{i}] out of range [0, {self.codebook_size})")
            grids.append(self.form.answer_grids(self, c))
        b, p_len, s_len = len(texts), max(map(len, prompts)), max(g[0].shape[1] for g in grids)
        q_n, fill = grids[0][0].shape[0], self.form.fill_id(self)
        input_ids = torch.full((b, p_len), self.pad_id, dtype=torch.long)
        answer_inputs = torch.full((b, q_n, s_len), fill, dtype=torch.long)
        labels = torch.full((b, q_n, s_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(b, p_len + s_len, dtype=torch.long)
        for i, (ids, (x, y)) in enumerate(zip(prompts, grids, strict=True)):
            input_ids[i, p_len - len(ids) :] = torch.tensor(ids)
            answer_inputs[i, :, : x.shape[1]], labels[i, :, : y.shape[1]] = x, y
            mask[i, p_len - len(ids) : p_len + x.shape[1]] = 1
        batch = dict(
            input_ids=input_ids,
            answer_inputs=answer_inputs,
            labels=labels,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        )
        if self.text_alignment:
            batch["text_span"] = torch.tensor(
                [[p_len - len(ids) + a, p_len - len(ids) + b] for ids in prompts for a, b in [self._text_span(ids)]],
                dtype=torch.long,
            ).reshape(-1, 2)
        if codes is not None:
            batch["answer_frames"] = torch.tensor([int(torch.as_tensor(c).shape[1]) for c in codes], dtype=torch.long)
        if self.loss_on_prompt if loss_on_prompt is None else loss_on_prompt:
            nxt = input_ids[:, 1:].masked_fill(mask[:, 1:p_len] == 0, IGNORE_INDEX)
            batch["prompt_labels"] = torch.cat([nxt, torch.full((b, 1), IGNORE_INDEX)], 1)
        return batch

    # ----------------------------------------------------------------------------------- model
    def _lm_logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits (optionally restricted to rows ``weight``), with Gemma's final softcap."""
        logits = self.lm.get_output_embeddings()(h) if weight is None else h @ weight.T
        cap = getattr(self.lm.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher-forced pass.

        Returns:
            ``loss`` (speech CE, plus prompt CE when ``prompt_labels`` is in the batch),
            ``speech_loss``, ``level_loss [Q']``, ``logits [B, Q', S, V']``, ``correct [Q']`` and
            ``total [Q']`` (argmax hits / counted targets per level over speech positions), and
            ``prompt_loss`` when computed; with ``length_conditioning`` also ``length_loss`` (MSE of
            ``log T``, included in ``loss``) and ``length_error`` (mean ``|T_pred - T|`` frames).
        """
        answer = batch["answer_inputs"].to(self.device)
        if self.training:
            answer = self.form.training_inputs(self, batch, answer)
        return self._teacher_forced(batch, answer)

    def _teacher_forced(self, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` on the answer inputs ``answer [B, Q', S]`` as given (corrupted or not)."""
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        p_len = input_ids.shape[1]
        answer_embeds = self.form.conditioned(self, self.form.embed(self, answer), answer, batch)
        embeds = torch.cat([self.lm.get_input_embeddings()(input_ids), answer_embeds], 1)
        h = self.lm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"].to(dev),
            position_ids=batch["position_ids"].to(dev),
            use_cache=False,
        ).last_hidden_state
        logits = self.form.logits(self, h[:, p_len:])
        labels = batch["labels"].to(dev)
        ce = F.cross_entropy(logits.flatten(0, 2).float(), labels.flatten(), reduction="none").view(
            labels.shape
        )
        valid = labels != IGNORE_INDEX
        total = valid.sum((0, 2))
        level_loss = (ce * valid).sum((0, 2)) / total.clamp(min=1)
        if self.level_weights is None:
            speech_loss = (ce * valid).sum() / total.sum().clamp(min=1)
        else:
            w = torch.tensor(self.level_weights, device=dev)
            speech_loss = (level_loss * w).sum() / w.sum()
        out = dict(
            speech_loss=speech_loss,
            level_loss=level_loss,
            logits=logits,
            correct=((logits.argmax(-1) == labels) & valid).sum((0, 2)),
            total=total,
        )
        loss = speech_loss
        out.update(self.form.length_losses(self, h[:, :p_len], batch))  # a length-conditioned model's
        if "length_loss" in out:
            loss = loss + out["length_loss"]
        if "prompt_labels" in batch:
            pl = batch["prompt_labels"].to(dev)
            out["prompt_loss"] = F.cross_entropy(
                self._lm_logits(h[:, :p_len]).flatten(0, 1).float(), pl.flatten(), ignore_index=IGNORE_INDEX
            )
            loss = loss + out["prompt_loss"]
        out["loss"] = loss
        return out

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        texts: list[str],
        *,
        max_frames: int,
        min_frames: int = 0,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        eos_rule: Literal["argmax", "median"] = "argmax",
        cfg_scale: float = 1.0,
        lengths: list[int] | torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Batched synthesis with a KV cache; each sequence stops at its own end of speech.

        Args:
            texts: ``B`` prompts (any lengths; left-padded internally).
            max_frames: Length guard: at most this many frames per utterance.
            min_frames: End of speech is forbidden before this many frames (benchmarks use
                ``min_frames == max_frames`` for fixed lengths).
            greedy: Argmax decoding (Speechless default); else sample.
            temperature: Sampling temperature.
            top_k: Sample among the ``k`` best only.
            seed: Seed for a private generator (sampling only).
            eos_rule: How a *greedy* decode decides the end of speech. ``"argmax"`` ends when
                end-of-speech is the single most likely output, as Ichigo/Speechless do; when a
                word's durations vary widely, end-of-speech rarely beats every code at any one step
                and greedy runs on to ``max_frames``. ``"median"`` ends at the first step where the
                model's own probability that speech is still going on, ``prod_t (1 - P_t(end))``,
                drops below 1/2: the median length of the model's length distribution. Sampling
                always samples the end like any other output.
            cfg_scale: Classifier-free guidance (Ho & Salimans 2022; as in AudioGen/MusicGen):
                logits ``u + cfg_scale * (c - u)`` of the prompted (``c``) and the empty-prompt
                (``u``) model, run as one doubled batch. ``1`` is plain decoding. Useful only for a
                model trained with some empty prompts (``SpeechlessStage(text_dropout=...)``);
                it pushes generations towards what is specific to the text.
            lengths: ``all_levels``: ``B`` frame counts; each utterance ends exactly there (clamped
                to ``[min_frames, max_frames]``), whatever ``eos_rule`` says. A length-conditioned
                model (``length_conditioning``) uses its own predicted lengths when this is None.

        Returns:
            ``B`` int64 code tensors on the CPU: ``[Q, T_i]`` (all_levels) or ``[1, T_i]``
            (one_level, durations expanded), ``T_i <= max_frames``.
        """
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        if not 0 <= min_frames <= max_frames:
            raise ValueError(f"need 0 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        if eos_rule not in ("argmax", "median"):
            raise ValueError(f"eos_rule must be 'argmax' or 'median', got {eos_rule!r}")
        if cfg_scale <= 0:
            raise ValueError(f"cfg_scale must be > 0, got {cfg_scale}")
        if lengths is not None:
            if self.output_form != "all_levels":
                raise ValueError("lengths needs output_form='all_levels'")
            lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
            if lengths.numel() != len(texts):
                raise ValueError(f"{len(texts)} texts but {lengths.numel()} lengths")
        was_training = self.training
        self.eval()
        try:
            guided = cfg_scale != 1.0 and len(texts) > 0
            # Guidance doubles the batch: rows B.. are the same decode with an empty prompt.
            batch = self.build_batch(texts + [""] * len(texts) if guided else texts, None, loss_on_prompt=False)
            gen = None
            if seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(seed)
            pick = lambda logits: decode_steps.pick(logits, greedy, temperature, top_k, gen)  # noqa: E731
            median, cfg = eos_rule == "median" and greedy, (cfg_scale if guided else None)
            return self.form.decode(self, batch, max_frames, min_frames, pick, median=median, cfg_scale=cfg,
                                    lengths=lengths)
        finally:
            self.train(was_training)

    def _prefill(self, batch: dict[str, torch.Tensor]):
        dev = self.device
        embeds = torch.cat(
            [
                self.lm.get_input_embeddings()(batch["input_ids"].to(dev)),
                self.form.embed(self, batch["answer_inputs"].to(dev)),
            ],
            1,
        )
        mask, pos = batch["attention_mask"].to(dev), batch["position_ids"].to(dev)
        out = self.lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True
        )
        return out.last_hidden_state[:, -1], cache_of(out), mask, pos[:, -1:]

    @torch.no_grad()
    def predict_lengths(self, texts: list[str]) -> torch.Tensor:
        """``[B]`` predicted frames per text (``length_conditioning`` models), at least 1."""
        if not self.length_conditioning:
            raise ValueError("predict_lengths needs a model built with length_conditioning=True")
        return self.form.predict_lengths(self, self.build_batch(texts, None, loss_on_prompt=False))

    def _advance(self, embeds: torch.Tensor, cache, mask: torch.Tensor, pos: torch.Tensor):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos + 1
        decoder = self.lm.get_decoder()
        out = decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg(decoder): cache}
        )
        return out.last_hidden_state[:, -1], cache_of(out), mask, pos

    # ----------------------------------------------------------------------------------- persistence
    def config_dict(self) -> dict[str, Any]:
        """Everything :meth:`load` needs besides weights and tokenizer."""
        return dict(
            num_levels=self.num_levels,
            codebook_size=self.codebook_size,
            output_form=self.output_form,
            use_durations=self.use_durations,
            max_duration=self.max_duration,
            delay=self.delay,
            loss_on_prompt=self.loss_on_prompt,
            **({"length_conditioning": True} if self.length_conditioning else {}),
            **({"text_alignment": True} if self.text_alignment else {}),
            **({"level_weights": self.level_weights} if self.level_weights is not None else {}),
            **({"input_corruption": self.input_corruption} if self.input_corruption else {}),
            **({"scheduled_sampling": self.scheduled_sampling} if self.scheduled_sampling else {}),
            lm_config=self.lm.config.to_dict(),
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``speech_lm.json``, ``model.safetensors`` and ``tokenizer/`` (no pickles)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        save_model(self, str(directory / _WEIGHTS_NAME))  # handles tied embeddings
        (directory / _CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> SpeechLM:
        """Rebuild a :meth:`save`-d model (no hub access, no pickle)."""
        directory = Path(directory)
        cfg = json.loads((directory / _CONFIG_NAME).read_text())
        lm_cfg = dict(cfg.pop("lm_config"))
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg))
        model = cls(lm=lm, tokenizer=AutoTokenizer.from_pretrained(directory / "tokenizer"), **cfg)
        load_model(model, str(directory / _WEIGHTS_NAME), device=str(device))
        return model.to(device)
