"""Stage 2: a decoder-only LM that writes semantic tokens (RVQ codes) for a text.

Follows Speechless (Dao et al., INTERSPEECH 2025, arXiv:2505.17417) and Ichigo (arXiv:2410.15316):
the prompt is the raw text in the chat template's user turn, the answer is the utterance's
semantic tokens, and decoding is greedy by default. Two output forms:

``one_level``
    Ichigo's form. The sound, duration and start/end tokens of :mod:`models.codec` are added to the
    LM vocabulary (embeddings resized) and the answer is the codec string of level-0 codes,
    run-length compressed when ``use_durations`` (plain de-duplication hurt convergence in
    Speechless; durations keep the sequence exact). ``<|sound_end|>`` ends the speech.

``all_levels``
    Stage 3 needs every RVQ level per frame, but spelling ``Q`` tokens per frame would multiply the
    sequence by ``Q`` (8x). Instead one position carries one frame: its input is the *sum* of ``Q``
    level embeddings (tables ``[K + 2, H]``: ``K`` codes, ``EOS = K``, ``PAD = K + 1`` which also
    serves as the begin-of-speech input) and ``Q`` linear heads ``[H, K + 1]`` predict the levels.
    With ``delay=True`` (default) level ``q`` is shifted right by ``q`` steps, MusicGen's delay
    pattern (Copet et al. 2023, arXiv:2306.05284): when a position predicts level ``q`` of frame
    ``t`` it has already seen levels ``< q`` of that frame, which matters for a *residual*
    quantizer whose fine levels refine the coarse ones; it costs only ``Q - 1`` extra steps.
    ``delay=False`` predicts the levels of a frame in parallel. Every head is trained to emit
    ``EOS`` one step after its last frame; at generation head 0 decides the length (the other
    heads' ``EOS`` is masked until their frame count reaches it, then forced), so levels never
    disagree on ``T``.

``length_conditioning`` (``all_levels`` only)
    A read sentence's length is set by its text, and a small LM trained on a few hundred sentences
    does not learn where its speech should end: greedy decoding then overruns by seconds. With
    this option a *length head* predicts the utterance's frames as the sum over the prompt's tokens
    of a per-token duration (``softplus`` of a linear layer on each prompt position's state, which
    has read the text and nothing of the speech; a TTS duration predictor's form, so the prediction
    grows with the text by construction), trained by MSE of ``log T`` beside the speech loss, and
    every answer position's input also carries an embedding of its *progress*: frames
    left ``T - s`` and the fraction ``s / T`` (sinusoids, projected; zero-initialised), with the real
    ``T`` in training and the predicted (or a given) one at generation, where head 0's end of speech
    is placed exactly at ``T``. Knowing how far it is into the utterance also tells the model how
    far it should be into the text, which is what the alignment of a read sentence needs (the
    length-conditioned TTS family: total duration given to the decoder, as in E2/F5-TTS).
    ``text_alignment`` goes one step further and adds to each answer step the embeddings of the text
    tokens a linear alignment (the text spread evenly over ``T``) places there, with their
    neighbours: the "which words now" that a duration-based TTS gets from its length regulator
    (FastSpeech), here without per-token durations. It made held-out generations specific to their
    text (word match 0.13 -> 1.00 on the sentence benchmark) where attention alone had not found it.

Both forms share one layout: prompts left-padded to ``P`` columns, answers right-padded to ``S``
columns, explicit ``position_ids`` so padding never shifts positions, and the text part always
embedded by the LM's own table (fed as ``inputs_embeds``). :meth:`SpeechLM.generate` is a manual
batched decode loop over the HF ``DynamicCache``. The real default LM is ``google/gemma-3-270m``
(:data:`DEFAULT_LM`); tests build a tiny ``Gemma3ForCausalLM`` via ``demo.tiny.gemma3_lm_debug_config``.
"""

from __future__ import annotations

import copy
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

from models.codec import SOUND_END, SOUND_START, duration_token, run_lengths, sound_token, sound_token_names
from models.kv_cache import cache_arg, cache_of

__all__ = ["DEFAULT_LM", "IGNORE_INDEX", "SpeechLM"]

DEFAULT_LM = "google/gemma-3-270m"
IGNORE_INDEX = -100
_CONFIG_NAME = "speech_lm.json"
_WEIGHTS_NAME = "model.safetensors"
_PROGRESS_FREQS = 16  # sinusoid pairs per progress quantity (frames left, fraction done)


def progress_features(steps: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Sinusoids of frames left ``total - steps`` and of the fraction ``steps / total``.

    Args:
        steps: ``[B, S]`` answer step of each position (frame index of level 0).
        total: ``[B]`` utterance length in frames.

    Returns:
        ``[B, S, 4 * _PROGRESS_FREQS]`` float features (frames left at periods 2 to ~2000 frames,
        the fraction at periods 1/8 to ~4 utterances).
    """
    total = total.to(steps.device, torch.float32).clamp(min=1)[:, None]
    left = (total - steps.float()).clamp(min=-1)
    frac = steps.float() / total
    j = torch.arange(_PROGRESS_FREQS, device=steps.device, dtype=torch.float32)
    w_left = 2 * torch.pi / (2.0 * 1000.0 ** (j / (_PROGRESS_FREQS - 1)))
    w_frac = 2 * torch.pi / (0.125 * 32.0 ** (j / (_PROGRESS_FREQS - 1)))
    a, b = left[..., None] * w_left, frac[..., None] * w_frac
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], -1)




def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    """Choose ids from ``logits [N, V]`` (``-inf`` marks disallowed) -> ``[N]``."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class SpeechLM(nn.Module):
    """Text -> semantic tokens decoder-only LM (see the module docstring for the two forms).

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
        if output_form == "one_level":
            self._add_sound_tokens()
        else:
            # Scale the new tables like the LM's (scaled) text embeddings, split over Q summands, so
            # the first steps do not see inputs orders of magnitude off what the LM was trained on.
            with torch.no_grad():
                emb = lm.get_input_embeddings()
                probe = torch.arange(min(emb.num_embeddings, 1024), device=emb.weight.device)
                std = float(emb(probe).float().std()) / num_levels**0.5
            self.level_embeddings = nn.ModuleList(
                nn.Embedding(codebook_size + 2, hidden) for _ in range(num_levels)
            )
            for e in self.level_embeddings:
                nn.init.normal_(e.weight, std=std)
            self.heads = nn.ModuleList(
                nn.Linear(hidden, codebook_size + 1, bias=False) for _ in range(num_levels)
            )
        if length_conditioning:
            self.length_head = nn.Linear(hidden, 1)  # frames per prompt token (softplus), summed
            nn.init.zeros_(self.length_head.weight)
            nn.init.constant_(self.length_head.bias, 1.85)  # softplus(1.85) = 2 frames a token before training
            self.progress = nn.Linear(4 * _PROGRESS_FREQS, hidden, bias=False)
            nn.init.zeros_(self.progress.weight)  # starts as the plain model; learns to use progress
        if text_alignment:
            self.alignment = nn.Linear(3 * hidden, hidden, bias=False)  # tokens j-1, j, j+1
            nn.init.zeros_(self.alignment.weight)

    # ----------------------------------------------------------------------------------- setup
    def _add_sound_tokens(self) -> None:
        names = sound_token_names(
            self.codebook_size, with_durations=self.use_durations, max_duration=self.max_duration
        )
        missing = [n for n in names if n not in self.tokenizer.get_vocab()]
        if missing:
            # A copy: the caller's tokenizer object may be shared (e.g. with stage 3's text side).
            self.tokenizer = copy.deepcopy(self.tokenizer)
            self.tokenizer.add_tokens(missing, special_tokens=True)
        if len(self.tokenizer) > self.lm.get_input_embeddings().num_embeddings:
            self.lm.resize_token_embeddings(len(self.tokenizer))
        ids = self.tokenizer.convert_tokens_to_ids
        self.start_id, self.end_id = ids(SOUND_START), ids(SOUND_END)
        sound = torch.tensor([ids(sound_token(c)) for c in range(self.codebook_size)])
        dur = [ids(duration_token(n)) for n in range(2, self.max_duration + 1)] if self.use_durations else []
        # Allowed answer tokens in a fixed order: K sounds, durations 2..max, end.
        self.register_buffer(
            "answer_vocab",
            torch.cat([sound, torch.tensor(dur, dtype=torch.long), torch.tensor([self.end_id])]),
            persistent=False,
        )

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
        return self.end_id if self.output_form == "one_level" else self.codebook_size

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

    def _answer_grids(self, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer inputs and targets ``[Q', S]`` for one utterance (``Q' = 1`` for one_level).

        With ``codes=None`` only the first input step (begin of speech) is returned, for generation.
        """
        if self.output_form == "one_level":
            if codes is None:
                return torch.tensor([[self.start_id]]), torch.full((1, 1), IGNORE_INDEX)
            seq = [self.start_id]
            for code, n in run_lengths(
                codes[0], max_duration=self.max_duration if self.use_durations else 1 << 30
            ):
                if n > 1 and self.use_durations:
                    seq += [int(self.answer_vocab[self.codebook_size + n - 2]), int(self.answer_vocab[code])]
                else:
                    seq += [int(self.answer_vocab[code])] * n
            seq.append(self.end_id)
            t = torch.tensor(seq).unsqueeze(0)
            return t[:, :-1], t[:, 1:]
        q_n, pad = self.num_levels, self.codebook_size + 1
        if codes is None:
            return torch.full((q_n, 1), pad), torch.full((q_n, 1), IGNORE_INDEX)
        n_frames, shift = codes.shape[1], (q_n - 1 if self.delay else 0)
        y = torch.full((q_n, n_frames + 1 + shift), IGNORE_INDEX, dtype=torch.long)
        for q in range(q_n):
            off = q if self.delay else 0
            y[q, off : off + n_frames] = codes[q]
            y[q, off + n_frames] = self.codebook_size  # EOS
        x = torch.cat([torch.full((q_n, 1), pad), y[:, :-1].masked_fill(y[:, :-1] == IGNORE_INDEX, pad)], 1)
        return x, y

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
                need = 1 if self.output_form == "one_level" else self.num_levels
                if c.ndim != 2 or c.shape[0] < need:
                    raise ValueError(f"codes[{i}] must be [Q>={need}, T], got {tuple(c.shape)}")
                if c.numel() and (c.min() < 0 or c.max() >= self.codebook_size):
                    raise ValueError(f"codes[{i}] out of range [0, {self.codebook_size})")
            grids.append(self._answer_grids(c))
        b, p_len, s_len = len(texts), max(map(len, prompts)), max(g[0].shape[1] for g in grids)
        q_n, fill = (
            grids[0][0].shape[0],
            (self.pad_id if self.output_form == "one_level" else self.codebook_size + 1),
        )
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
    def _embed_answer(self, answer_inputs: torch.Tensor) -> torch.Tensor:
        """``[B, Q', S]`` ids -> ``[B, S, H]`` input embeddings."""
        if self.output_form == "one_level":
            return self.lm.get_input_embeddings()(answer_inputs[:, 0])
        return torch.stack([e(answer_inputs[:, q]) for q, e in enumerate(self.level_embeddings)]).sum(0)

    def _corrupt(self, answer: torch.Tensor) -> torch.Tensor:
        """``[B, Q, S]`` answer inputs with a fraction ``input_corruption`` of their codes (never EOS or
        PAD/begin) replaced by random codes."""
        hit = (torch.rand(answer.shape, device=answer.device) < self.input_corruption) & (answer < self.codebook_size)
        return torch.where(hit, torch.randint_like(answer, self.codebook_size), answer)

    def _self_fed(self, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> torch.Tensor:
        """``answer [B, Q, S]`` with a fraction ``scheduled_sampling`` of its steps replaced by the
        model's own greedy predictions of those steps (one no-grad teacher-forced pass); only real
        codes are replaced, by predicted codes (never by EOS, never the begin step or padding)."""
        with torch.no_grad():
            was = self.training
            self.eval()  # the predictions of the model that generates (no dropout)
            try:
                pred = self._teacher_forced(batch, answer)["logits"].argmax(-1)  # [B, Q, S]: step s predicts s+1's input
            finally:
                self.train(was)
        b, _, s_len = answer.shape
        fed = (torch.rand(b, 1, s_len, device=answer.device) < self.scheduled_sampling)[..., 1:]
        new = pred[..., :-1]
        hit = fed & (answer[..., 1:] < self.codebook_size) & (new < self.codebook_size)
        return torch.cat([answer[..., :1], torch.where(hit, new, answer[..., 1:])], -1)

    def _log_length(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` predicted ``log T``: the sum over the prompt's tokens (``h [B, P, H]``, ``mask [B, P]``)
        of each token's frames, ``softplus(length_head(h_i))``, as a TTS duration predictor sums its
        per-token durations: the prediction grows with the text by construction."""
        per_token = F.softplus(self.length_head(h).squeeze(-1).float()) * mask.float()
        return per_token.sum(1).clamp(min=1e-3).log()

    def _progress(self, steps: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` progress embeddings of answer steps ``[B, S]`` of utterances of ``total [B]`` frames."""
        return self.progress(progress_features(steps, total).to(self.progress.weight.dtype))

    def _condition(self, steps: torch.Tensor, total: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, S, H]`` what a length-conditioned answer step adds to its input: progress, plus the
        linearly aligned text tokens (``text_alignment``; zero for an empty text)."""
        out = self._progress(steps, total)
        if not self.text_alignment:
            return out
        ids, span = batch["input_ids"].to(steps.device), batch["text_span"].to(steps.device)
        n = (span[:, 1] - span[:, 0])[:, None]  # [B, 1] text tokens
        idx = (steps * n).div(total.to(steps.device).clamp(min=1)[:, None], rounding_mode="floor")
        table = self.lm.get_input_embeddings()
        parts = []
        for off in (-1, 0, 1):
            j = span[:, :1] + (idx + off).clamp(min=0).minimum((n - 1).clamp(min=0))  # [B, S]
            parts.append(table(ids.gather(1, j.clamp(max=ids.shape[1] - 1))))
        aligned = self.alignment(torch.cat(parts, -1).to(self.alignment.weight.dtype))
        return out + aligned * (n > 0)[..., None]

    def _lm_logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """LM-head logits (optionally restricted to rows ``weight``), with Gemma's final softcap."""
        logits = self.lm.get_output_embeddings()(h) if weight is None else h @ weight.T
        cap = getattr(self.lm.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _speech_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` -> ``[B, Q', S, V']`` (``V'`` = LM vocab or ``K + 1``)."""
        if self.output_form == "one_level":
            return self._lm_logits(h).unsqueeze(1)
        return torch.stack([head(h) for head in self.heads], 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher-forced pass.

        Returns:
            ``loss`` (speech CE, plus prompt CE when ``prompt_labels`` is in the batch),
            ``speech_loss``, ``level_loss [Q']``, ``logits [B, Q', S, V']``, ``correct [Q']`` and
            ``total [Q']`` (argmax hits / counted targets per level over speech positions), and
            ``prompt_loss`` when computed; with ``length_conditioning`` also ``length_loss`` (MSE of
            ``log T``, included in ``loss``) and ``length_error`` (mean ``|T_pred - T|`` frames).
        """
        dev = self.device
        answer = batch["answer_inputs"].to(dev)
        if self.training and self.input_corruption > 0:
            answer = self._corrupt(answer)
        if self.training and self.scheduled_sampling > 0:
            answer = self._self_fed(batch, answer)
        return self._teacher_forced(batch, answer)

    def _teacher_forced(self, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` on the answer inputs ``answer [B, Q', S]`` as given (corrupted or not)."""
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        p_len = input_ids.shape[1]
        answer_embeds = self._embed_answer(answer)
        if self.length_conditioning:
            frames = batch["answer_frames"].to(dev)
            steps = torch.arange(answer.shape[-1], device=dev).expand(answer.shape[0], -1)
            answer_embeds = answer_embeds + self._condition(steps, frames, batch)
        embeds = torch.cat([self.lm.get_input_embeddings()(input_ids), answer_embeds], 1)
        h = self.lm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"].to(dev),
            position_ids=batch["position_ids"].to(dev),
            use_cache=False,
        ).last_hidden_state
        logits = self._speech_logits(h[:, p_len:])
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
        if self.length_conditioning:
            log_pred = self._log_length(h[:, :p_len], batch["attention_mask"][:, :p_len].to(dev))
            out["length_loss"] = F.mse_loss(log_pred, frames.float().clamp(min=1).log())
            out["length_error"] = (log_pred.detach().exp() - frames.float()).abs().mean()
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
            pick = lambda logits: _pick(logits, greedy, temperature, top_k, gen)  # noqa: E731
            median, cfg = eos_rule == "median" and greedy, (cfg_scale if guided else None)
            if self.output_form == "one_level":
                return self._decode_one_level(batch, max_frames, min_frames, pick, median=median, cfg_scale=cfg)
            return self._decode_all_levels(batch, max_frames, min_frames, pick, median=median, cfg_scale=cfg,
                                           lengths=lengths)
        finally:
            self.train(was_training)

    def _prefill(self, batch: dict[str, torch.Tensor]):
        dev = self.device
        embeds = torch.cat(
            [
                self.lm.get_input_embeddings()(batch["input_ids"].to(dev)),
                self._embed_answer(batch["answer_inputs"].to(dev)),
            ],
            1,
        )
        mask, pos = batch["attention_mask"].to(dev), batch["position_ids"].to(dev)
        out = self.lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True
        )
        return out.last_hidden_state[:, -1], cache_of(out), mask, pos[:, -1:]

    def _prefill_prompt(self, batch: dict[str, torch.Tensor]):
        """Prefill the prompt alone: its states ``[B, P, H]`` (the length head's input), cache, mask, position."""
        dev, p_len = self.device, batch["input_ids"].shape[1]
        mask, pos = batch["attention_mask"][:, :p_len].to(dev), batch["position_ids"][:, :p_len].to(dev)
        out = self.lm.get_decoder()(
            inputs_embeds=self.lm.get_input_embeddings()(batch["input_ids"].to(dev)), attention_mask=mask,
            position_ids=pos, use_cache=True,
        )
        return out.last_hidden_state, cache_of(out), mask, pos[:, -1:]

    @torch.no_grad()
    def predict_lengths(self, texts: list[str]) -> torch.Tensor:
        """``[B]`` predicted frames per text (``length_conditioning`` models), at least 1."""
        if not self.length_conditioning:
            raise ValueError("predict_lengths needs a model built with length_conditioning=True")
        h, _, mask, _ = self._prefill_prompt(self.build_batch(texts, None, loss_on_prompt=False))
        return self._log_length(h, mask).exp().round().long().clamp(min=1).cpu()

    def _advance(self, embeds: torch.Tensor, cache, mask: torch.Tensor, pos: torch.Tensor):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos + 1
        decoder = self.lm.get_decoder()
        out = decoder(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg(decoder): cache}
        )
        return out.last_hidden_state[:, -1], cache_of(out), mask, pos

    @staticmethod
    def _guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
        """Rows ``[c; u]`` (``2B``) -> guided ``u + s (c - u)`` (``B``); unchanged without guidance."""
        if cfg_scale is None:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @staticmethod
    def _twice(x: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
        """The next inputs of ``B`` rows, repeated for the unprompted half under guidance."""
        return x if cfg_scale is None else torch.cat([x, x])

    @staticmethod
    def _median_stop(logits: torch.Tensor, eos: int, survival: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update ``survival`` (P(speech goes on)) with this step's end hazard; force/forbid the end.

        Returns the masked ``logits`` (end forced where survival fell below 1/2, forbidden elsewhere)
        and the new survival.
        """
        survival = survival * (1 - logits.float().softmax(-1)[:, eos])
        stop = (survival < 0.5).unsqueeze(1)
        is_eos = torch.zeros_like(logits, dtype=torch.bool)
        is_eos[:, eos] = True
        return logits.masked_fill(stop ^ is_eos, float("-inf")), survival

    def _decode_one_level(
        self, batch, max_frames: int, min_frames: int, pick, median: bool = False, cfg_scale: float | None = None
    ) -> list[torch.Tensor]:
        dev, k = self.device, self.codebook_size
        n_dur = len(self.answer_vocab) - k - 1
        weight = self.lm.get_output_embeddings().weight[self.answer_vocab]  # [A, H]
        h, cache, mask, pos = self._prefill(batch)
        b = h.shape[0] // (1 if cfg_scale is None else 2)
        survival = torch.ones(b, device=dev)
        frames = torch.zeros(b, dtype=torch.long, device=dev)
        pending = torch.zeros(b, dtype=torch.long, device=dev)  # run length set by a duration token
        done = torch.full((b,), max_frames == 0, device=dev)
        out = torch.zeros(b, max_frames, dtype=torch.long, device=dev)
        durations = torch.arange(2, n_dur + 2, device=dev)
        cols = torch.arange(max_frames, device=dev)
        for _ in range(2 * max_frames + 1):  # a sound adds >= 1 frame; a duration needs a sound next
            if bool(done.all()):
                break
            logits = self._guide(self._lm_logits(h, weight).float(), cfg_scale)  # [B, A]
            remaining = (max_frames - frames).unsqueeze(1)
            ban = torch.zeros_like(logits, dtype=torch.bool)
            ban[:, k : k + n_dur] = (durations.unsqueeze(0) > remaining) | (pending > 0).unsqueeze(1)
            ban[:, -1] = (pending > 0) | (frames < min_frames)
            logits = logits.masked_fill(ban, float("-inf"))
            if median:  # the end hazard is read only where the end is allowed (after a sound)
                free = ~ban[:, -1]
                stopped, new_survival = self._median_stop(logits, logits.shape[1] - 1, survival)
                logits = torch.where(free.unsqueeze(1), stopped, logits)
                survival = torch.where(free & ~done, new_survival, survival)
            choice = pick(logits)
            is_sound = (choice < k) & ~done
            run = torch.where(pending > 0, pending, torch.ones_like(pending))
            write = (
                is_sound.unsqueeze(1) & (cols >= frames.unsqueeze(1)) & (cols < (frames + run).unsqueeze(1))
            )
            out = torch.where(write, choice.unsqueeze(1), out)
            frames = frames + torch.where(is_sound, run, 0)
            is_dur = (choice >= k) & (choice < k + n_dur) & ~done
            pending = torch.where(is_dur, choice - k + 2, torch.where(is_sound, 0, pending))
            done = done | (choice == k + n_dur) | (frames >= max_frames)
            h, cache, mask, pos = self._advance(
                self._twice(self.lm.get_input_embeddings()(self.answer_vocab[choice]).unsqueeze(1), cfg_scale),
                cache, mask, pos,
            )
        return [out[i, : int(frames[i])].unsqueeze(0).cpu() for i in range(b)]

    def _decode_all_levels(
        self, batch, max_frames: int, min_frames: int, pick, median: bool = False, cfg_scale: float | None = None,
        lengths: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        dev, k, q_n = self.device, self.codebook_size, self.num_levels
        eos, pad = k, k + 1
        shift = (
            torch.arange(q_n, device=dev) if self.delay else torch.zeros(q_n, dtype=torch.long, device=dev)
        )
        target = None  # [B] frames each row ends at, when fixed in advance
        if self.length_conditioning:
            h, cache, mask, pos = self._prefill_prompt(batch)
            b = h.shape[0] // (1 if cfg_scale is None else 2)
            if lengths is None:
                lengths = self._log_length(h[:b], mask[:b]).exp().round().long()
            target = lengths.to(dev).clamp(min_frames, max_frames)
            first = torch.full((h.shape[0], q_n), pad, dtype=torch.long, device=dev)
            embeds = self._embed_answer(first[..., None])  # [B', 1, H]: begin of speech
            steps = torch.zeros(h.shape[0], 1, dtype=torch.long, device=dev)
            h, cache, mask, pos = self._advance(embeds + self._condition(steps, self._twice(target, cfg_scale), batch),
                                                cache, mask, pos)
        else:
            h, cache, mask, pos = self._prefill(batch)
            b = h.shape[0] // (1 if cfg_scale is None else 2)
            if lengths is not None:
                target = lengths.to(dev).clamp(min_frames, max_frames)
        length = torch.full((b,), -1, dtype=torch.long, device=dev)  # T per row, -1 until head 0 ends
        out = torch.zeros(b, q_n, max_frames, dtype=torch.long, device=dev)
        survival = torch.ones(b, device=dev)  # P(speech has not ended yet) under head 0's EOS hazard
        for s in range(max_frames + 1 + int(shift[-1])):
            frame = s - shift  # [Q] frame index each level is at
            logits = self._guide(torch.stack([head(h) for head in self.heads], 1).float(), cfg_scale)  # [B, Q, K+1]
            # Head 0 ends the utterance (forced at max_frames); the others may not end on their own.
            logits[:, 1:, eos] = float("-inf")
            if target is not None:
                if frame[0] >= 0:  # end exactly at the row's target: forbidden before, forced there
                    end = (frame[0] >= target)[:, None]
                    is_eos = torch.arange(k + 1, device=dev)[None] == eos
                    logits[:, 0] = logits[:, 0].masked_fill(end ^ is_eos, float("-inf"))
            elif frame[0] >= 0 and frame[0] >= max_frames:
                logits[:, 0, :eos] = float("-inf")
            elif frame[0] < min_frames:
                logits[:, 0, eos] = float("-inf")
            elif median and frame[0] >= 0:
                logits[:, 0], survival = self._median_stop(logits[:, 0], eos, survival)
            choice = pick(logits.flatten(0, 1)).view(b, q_n)
            if frame[0] >= 0:
                length = torch.where((length < 0) & (choice[:, 0] == eos), int(frame[0]), length)
            known = (length >= 0).unsqueeze(1)
            f = frame.unsqueeze(0).expand(b, q_n)
            choice = torch.where(known & (f == length.unsqueeze(1)), eos, choice)
            choice = torch.where((f < 0) | (known & (f > length.unsqueeze(1))), pad, choice)
            for q in range(q_n):  # every row is at the same frame of level q
                fq = int(frame[q])
                if 0 <= fq < max_frames:
                    out[:, q, fq] = torch.where(choice[:, q] < k, choice[:, q], out[:, q, fq])
            if bool(((length >= 0) & (s >= length + shift[-1])).all()):
                break
            embeds = self._twice(self._embed_answer(choice[..., None]), cfg_scale)
            if self.length_conditioning:  # the next input is answer step s + 1
                steps = torch.full((embeds.shape[0], 1), s + 1, dtype=torch.long, device=dev)
                embeds = embeds + self._condition(steps, self._twice(target, cfg_scale), batch)
            h, cache, mask, pos = self._advance(embeds, cache, mask, pos)
        return [out[i, :, : int(length[i])].cpu() for i in range(b)]

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
