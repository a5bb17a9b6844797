"""The ``all_levels`` output form of :class:`models.speech_lm.SpeechLM`: one position per frame.

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

``length_conditioning`` (this form only)
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

The form is a plain object, part of :class:`SpeechLM`'s implementation: its layers are created on
the model it serves (``level_embeddings``, ``heads``, ``length_head``, ``progress``, ``alignment``),
under the names saved weights and checkpoints have always used; each method takes that model as
``m`` and may use its shared decode steps (``_prefill``, ``_advance``; :mod:`models.speech_lm_decode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.chat_format import IGNORE_INDEX
from models.kv_cache import cache_of
from models.speech_lm_decode import guide, median_stop, twice

if TYPE_CHECKING:
    from models.speech_lm import SpeechLM

__all__ = ["AllLevels", "progress_features"]

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


class AllLevels:
    """Summed level embeddings in, ``Q`` heads out, a frame per step (see the module docstring)."""

    name = "all_levels"

    # ----------------------------------------------------------------------------------- setup
    def build(self, m: SpeechLM, hidden: int) -> None:
        """Create the level tables and heads (and the length-conditioning layers) on ``m``."""
        lm, num_levels, codebook_size = m.lm, m.num_levels, m.codebook_size
        # Scale the new tables like the LM's (scaled) text embeddings, split over Q summands, so
        # the first steps do not see inputs orders of magnitude off what the LM was trained on.
        with torch.no_grad():
            emb = lm.get_input_embeddings()
            probe = torch.arange(min(emb.num_embeddings, 1024), device=emb.weight.device)
            std = float(emb(probe).float().std()) / num_levels**0.5
        m.level_embeddings = nn.ModuleList(nn.Embedding(codebook_size + 2, hidden) for _ in range(num_levels))
        for e in m.level_embeddings:
            nn.init.normal_(e.weight, std=std)
        m.heads = nn.ModuleList(nn.Linear(hidden, codebook_size + 1, bias=False) for _ in range(num_levels))
        if m.length_conditioning:
            m.length_head = nn.Linear(hidden, 1)  # frames per prompt token (softplus), summed
            nn.init.zeros_(m.length_head.weight)
            nn.init.constant_(m.length_head.bias, 1.85)  # softplus(1.85) = 2 frames a token before training
            m.progress = nn.Linear(4 * _PROGRESS_FREQS, hidden, bias=False)
            nn.init.zeros_(m.progress.weight)  # starts as the plain model; learns to use progress
        if m.text_alignment:
            m.alignment = nn.Linear(3 * hidden, hidden, bias=False)  # tokens j-1, j, j+1
            nn.init.zeros_(m.alignment.weight)

    def eos_id(self, m: SpeechLM) -> int:
        return m.codebook_size

    def rows(self, m: SpeechLM) -> int:
        """``Q'``: rows of an answer grid, and the code levels it needs."""
        return m.num_levels

    def fill_id(self, m: SpeechLM) -> int:
        """The answer-input id padding a grid: ``PAD = K + 1``."""
        return m.codebook_size + 1

    # ----------------------------------------------------------------------------------- batching
    def answer_grids(self, m: SpeechLM, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer inputs and targets ``[Q, S]`` of one utterance (``codes [Q, T]``, delayed by level).

        With ``codes=None`` only the first input step (begin of speech) is returned, for generation.
        """
        q_n, pad = m.num_levels, m.codebook_size + 1
        if codes is None:
            return torch.full((q_n, 1), pad), torch.full((q_n, 1), IGNORE_INDEX)
        n_frames, shift = codes.shape[1], (q_n - 1 if m.delay else 0)
        y = torch.full((q_n, n_frames + 1 + shift), IGNORE_INDEX, dtype=torch.long)
        for q in range(q_n):
            off = q if m.delay else 0
            y[q, off : off + n_frames] = codes[q]
            y[q, off + n_frames] = m.codebook_size  # EOS
        x = torch.cat([torch.full((q_n, 1), pad), y[:, :-1].masked_fill(y[:, :-1] == IGNORE_INDEX, pad)], 1)
        return x, y

    # ----------------------------------------------------------------------------------- model
    def embed(self, m: SpeechLM, answer_inputs: torch.Tensor) -> torch.Tensor:
        """``[B, Q, S]`` ids -> ``[B, S, H]``: the sum of the level embeddings."""
        return torch.stack([e(answer_inputs[:, q]) for q, e in enumerate(m.level_embeddings)]).sum(0)

    def logits(self, m: SpeechLM, h: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` -> ``[B, Q, S, K + 1]``."""
        return torch.stack([head(h) for head in m.heads], 1)

    def training_inputs(self, m: SpeechLM, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> torch.Tensor:
        """The teacher-forced inputs of a training step: corrupted and self-fed as configured."""
        if m.input_corruption > 0:
            answer = self.corrupt(m, answer)
        if m.scheduled_sampling > 0:
            answer = self.self_fed(m, batch, answer)
        return answer

    def corrupt(self, m: SpeechLM, answer: torch.Tensor) -> torch.Tensor:
        """``[B, Q, S]`` answer inputs with a fraction ``input_corruption`` of their codes (never EOS or
        PAD/begin) replaced by random codes."""
        hit = (torch.rand(answer.shape, device=answer.device) < m.input_corruption) & (answer < m.codebook_size)
        return torch.where(hit, torch.randint_like(answer, m.codebook_size), answer)

    def self_fed(self, m: SpeechLM, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> torch.Tensor:
        """``answer [B, Q, S]`` with a fraction ``scheduled_sampling`` of its steps replaced by the
        model's own greedy predictions of those steps (one no-grad teacher-forced pass); only real
        codes are replaced, by predicted codes (never by EOS, never the begin step or padding)."""
        with torch.no_grad():
            was = m.training
            m.eval()  # the predictions of the model that generates (no dropout)
            try:
                pred = m._teacher_forced(batch, answer)["logits"].argmax(-1)  # [B, Q, S]: step s predicts s+1's input
            finally:
                m.train(was)
        b, _, s_len = answer.shape
        fed = (torch.rand(b, 1, s_len, device=answer.device) < m.scheduled_sampling)[..., 1:]
        new = pred[..., :-1]
        hit = fed & (answer[..., 1:] < m.codebook_size) & (new < m.codebook_size)
        return torch.cat([answer[..., :1], torch.where(hit, new, answer[..., 1:])], -1)

    def conditioned(self, m: SpeechLM, embeds: torch.Tensor, answer: torch.Tensor, batch: dict) -> torch.Tensor:
        """Teacher forcing's answer embeddings ``[B, S, H]`` plus, when length-conditioned, the
        condition of each step (the real ``answer_frames``)."""
        if not m.length_conditioning:
            return embeds
        steps = torch.arange(answer.shape[-1], device=embeds.device).expand(answer.shape[0], -1)
        return embeds + self.condition(m, steps, batch["answer_frames"].to(embeds.device), batch)

    def length_losses(self, m: SpeechLM, h_prompt: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """``length_loss`` (MSE of ``log T``) and ``length_error`` (mean ``|T_pred - T|`` frames) of a
        length-conditioned model from the prompt's states ``h_prompt [B, P, H]``; else nothing."""
        if not m.length_conditioning:
            return {}
        p_len = h_prompt.shape[1]
        frames = batch["answer_frames"].to(h_prompt.device)
        log_pred = self.log_length(m, h_prompt, batch["attention_mask"][:, :p_len].to(h_prompt.device))
        return {
            "length_loss": F.mse_loss(log_pred, frames.float().clamp(min=1).log()),
            "length_error": (log_pred.detach().exp() - frames.float()).abs().mean(),
        }

    def log_length(self, m: SpeechLM, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` predicted ``log T``: the sum over the prompt's tokens (``h [B, P, H]``, ``mask [B, P]``)
        of each token's frames, ``softplus(length_head(h_i))``, as a TTS duration predictor sums its
        per-token durations: the prediction grows with the text by construction."""
        per_token = F.softplus(m.length_head(h).squeeze(-1).float()) * mask.float()
        return per_token.sum(1).clamp(min=1e-3).log()

    def condition(self, m: SpeechLM, steps: torch.Tensor, total: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, S, H]`` what a length-conditioned answer step adds to its input: progress embeddings
        of steps ``[B, S]`` of utterances of ``total [B]`` frames, plus the linearly aligned text
        tokens (``text_alignment``; zero for an empty text)."""
        out = m.progress(progress_features(steps, total).to(m.progress.weight.dtype))
        if not m.text_alignment:
            return out
        ids, span = batch["input_ids"].to(steps.device), batch["text_span"].to(steps.device)
        n = (span[:, 1] - span[:, 0])[:, None]  # [B, 1] text tokens
        idx = (steps * n).div(total.to(steps.device).clamp(min=1)[:, None], rounding_mode="floor")
        table = m.lm.get_input_embeddings()
        parts = []
        for off in (-1, 0, 1):
            j = span[:, :1] + (idx + off).clamp(min=0).minimum((n - 1).clamp(min=0))  # [B, S]
            parts.append(table(ids.gather(1, j.clamp(max=ids.shape[1] - 1))))
        aligned = m.alignment(torch.cat(parts, -1).to(m.alignment.weight.dtype))
        return out + aligned * (n > 0)[..., None]

    # ----------------------------------------------------------------------------------- generation
    def prefill_prompt(self, m: SpeechLM, batch: dict[str, torch.Tensor]):
        """Prefill the prompt alone: its states ``[B, P, H]`` (the length head's input), cache, mask, position."""
        dev, p_len = m.device, batch["input_ids"].shape[1]
        mask, pos = batch["attention_mask"][:, :p_len].to(dev), batch["position_ids"][:, :p_len].to(dev)
        out = m.lm.get_decoder()(
            inputs_embeds=m.lm.get_input_embeddings()(batch["input_ids"].to(dev)), attention_mask=mask,
            position_ids=pos, use_cache=True,
        )
        return out.last_hidden_state, cache_of(out), mask, pos[:, -1:]

    def predict_lengths(self, m: SpeechLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` predicted frames of a prompts-only batch, at least 1."""
        h, _, mask, _ = self.prefill_prompt(m, batch)
        return self.log_length(m, h, mask).exp().round().long().clamp(min=1).cpu()

    def decode(
        self, m: SpeechLM, batch, max_frames: int, min_frames: int, pick, median: bool = False,
        cfg_scale: float | None = None, lengths: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """The decode loop (see :meth:`SpeechLM.generate`): ``B`` codes ``[Q, T_i]`` on the CPU."""
        dev, k, q_n = m.device, m.codebook_size, m.num_levels
        eos, pad = k, k + 1
        shift = (
            torch.arange(q_n, device=dev) if m.delay else torch.zeros(q_n, dtype=torch.long, device=dev)
        )
        target = None  # [B] frames each row ends at, when fixed in advance
        if m.length_conditioning:
            h, cache, mask, pos = self.prefill_prompt(m, batch)
            b = h.shape[0] // (1 if cfg_scale is None else 2)
            if lengths is None:
                lengths = self.log_length(m, h[:b], mask[:b]).exp().round().long()
            target = lengths.to(dev).clamp(min_frames, max_frames)
            first = torch.full((h.shape[0], q_n), pad, dtype=torch.long, device=dev)
            embeds = self.embed(m, first[..., None])  # [B', 1, H]: begin of speech
            steps = torch.zeros(h.shape[0], 1, dtype=torch.long, device=dev)
            h, cache, mask, pos = m._advance(embeds + self.condition(m, steps, twice(target, cfg_scale), batch),
                                             cache, mask, pos)
        else:
            h, cache, mask, pos = m._prefill(batch)
            b = h.shape[0] // (1 if cfg_scale is None else 2)
            if lengths is not None:
                target = lengths.to(dev).clamp(min_frames, max_frames)
        length = torch.full((b,), -1, dtype=torch.long, device=dev)  # T per row, -1 until head 0 ends
        out = torch.zeros(b, q_n, max_frames, dtype=torch.long, device=dev)
        survival = torch.ones(b, device=dev)  # P(speech has not ended yet) under head 0's EOS hazard
        for s in range(max_frames + 1 + int(shift[-1])):
            frame = s - shift  # [Q] frame index each level is at
            logits = guide(torch.stack([head(h) for head in m.heads], 1).float(), cfg_scale)  # [B, Q, K+1]
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
                logits[:, 0], survival = median_stop(logits[:, 0], eos, survival)
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
            embeds = twice(self.embed(m, choice[..., None]), cfg_scale)
            if m.length_conditioning:  # the next input is answer step s + 1
                steps = torch.full((embeds.shape[0], 1), s + 1, dtype=torch.long, device=dev)
                embeds = embeds + self.condition(m, steps, twice(target, cfg_scale), batch)
            h, cache, mask, pos = m._advance(embeds, cache, mask, pos)
        return [out[i, :, : int(length[i])].cpu() for i in range(b)]
