"""The ``one_level`` output form of :class:`models.speech_lm.SpeechLM`: Ichigo's token strings.

The sound, duration and start/end tokens of :mod:`models.codec` are added to the LM vocabulary
(embeddings resized) and the answer is the codec string of level-0 codes, run-length compressed
when ``use_durations`` (plain de-duplication hurt convergence in Speechless; durations keep the
sequence exact). ``<|sound_end|>`` ends the speech. Inputs are embedded and outputs scored by the
LM's own tables, restricted at generation to the answer vocabulary.

The form is a plain object, part of :class:`SpeechLM`'s implementation: what it adds (tokens,
``start_id``/``end_id``, the ``answer_vocab`` buffer) lives on the model it serves, and each method
takes that model as ``m`` and may use its shared decode steps (``_prefill``, ``_advance``; :mod:`models.speech_lm_decode`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from models.chat_format import IGNORE_INDEX
from models.codec import SOUND_END, SOUND_START, duration_token, run_lengths, sound_token, sound_token_names
from models.speech_lm_decode import guide, median_stop, twice

if TYPE_CHECKING:
    from models.speech_lm import SpeechLM

__all__ = ["OneLevel"]


class OneLevel:
    """Level-0 codes as LM tokens, with duration tokens for runs (see the module docstring)."""

    name = "one_level"

    # ----------------------------------------------------------------------------------- setup
    def build(self, m: SpeechLM, hidden: int) -> None:
        """Add the sound tokens to ``m``'s tokenizer and LM; set ``start_id``, ``end_id``, ``answer_vocab``."""
        names = sound_token_names(m.codebook_size, with_durations=m.use_durations, max_duration=m.max_duration)
        missing = [n for n in names if n not in m.tokenizer.get_vocab()]
        if missing:
            # A copy: the caller's tokenizer object may be shared (e.g. with stage 3's text side).
            m.tokenizer = copy.deepcopy(m.tokenizer)
            m.tokenizer.add_tokens(missing, special_tokens=True)
        if len(m.tokenizer) > m.lm.get_input_embeddings().num_embeddings:
            m.lm.resize_token_embeddings(len(m.tokenizer))
        ids = m.tokenizer.convert_tokens_to_ids
        m.start_id, m.end_id = ids(SOUND_START), ids(SOUND_END)
        sound = torch.tensor([ids(sound_token(c)) for c in range(m.codebook_size)])
        dur = [ids(duration_token(n)) for n in range(2, m.max_duration + 1)] if m.use_durations else []
        # Allowed answer tokens in a fixed order: K sounds, durations 2..max, end.
        m.register_buffer(
            "answer_vocab",
            torch.cat([sound, torch.tensor(dur, dtype=torch.long), torch.tensor([m.end_id])]),
            persistent=False,
        )

    def eos_id(self, m: SpeechLM) -> int:
        return m.end_id

    def rows(self, m: SpeechLM) -> int:
        """``Q' = 1``: one row of LM token ids, read from code level 0."""
        return 1

    def fill_id(self, m: SpeechLM) -> int:
        """The answer-input id padding a grid: the tokenizer's pad."""
        return m.pad_id

    # ----------------------------------------------------------------------------------- batching
    def answer_grids(self, m: SpeechLM, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer inputs and targets ``[1, S]`` of one utterance: ``<|sound_start|>`` + the codec
        string of ``codes[0]`` + ``<|sound_end|>``, shifted by one.

        With ``codes=None`` only the first input step (begin of speech) is returned, for generation.
        """
        if codes is None:
            return torch.tensor([[m.start_id]]), torch.full((1, 1), IGNORE_INDEX)
        seq = [m.start_id]
        for code, n in run_lengths(codes[0], max_duration=m.max_duration if m.use_durations else 1 << 30):
            if n > 1 and m.use_durations:
                seq += [int(m.answer_vocab[m.codebook_size + n - 2]), int(m.answer_vocab[code])]
            else:
                seq += [int(m.answer_vocab[code])] * n
        seq.append(m.end_id)
        t = torch.tensor(seq).unsqueeze(0)
        return t[:, :-1], t[:, 1:]

    # ----------------------------------------------------------------------------------- model
    def embed(self, m: SpeechLM, answer_inputs: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S]`` token ids -> ``[B, S, H]`` by the LM's own table."""
        return m.lm.get_input_embeddings()(answer_inputs[:, 0])

    def logits(self, m: SpeechLM, h: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` -> ``[B, 1, S, V]`` LM-head logits."""
        return m._lm_logits(h).unsqueeze(1)

    def training_inputs(self, m: SpeechLM, batch: dict[str, torch.Tensor], answer: torch.Tensor) -> torch.Tensor:
        return answer  # input corruption and scheduled sampling are all_levels options

    def conditioned(self, m: SpeechLM, embeds: torch.Tensor, answer: torch.Tensor, batch: dict) -> torch.Tensor:
        return embeds  # no length conditioning in this form

    def length_losses(self, m: SpeechLM, h_prompt: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    # ----------------------------------------------------------------------------------- generation
    def decode(
        self, m: SpeechLM, batch, max_frames: int, min_frames: int, pick, median: bool = False,
        cfg_scale: float | None = None, lengths: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """The decode loop (see :meth:`SpeechLM.generate`): ``B`` codes ``[1, T_i]`` on the CPU,
        durations expanded."""
        dev, k = m.device, m.codebook_size
        n_dur = len(m.answer_vocab) - k - 1
        weight = m.lm.get_output_embeddings().weight[m.answer_vocab]  # [A, H]
        h, cache, mask, pos = m._prefill(batch)
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
            logits = guide(m._lm_logits(h, weight).float(), cfg_scale)  # [B, A]
            remaining = (max_frames - frames).unsqueeze(1)
            ban = torch.zeros_like(logits, dtype=torch.bool)
            ban[:, k : k + n_dur] = (durations.unsqueeze(0) > remaining) | (pending > 0).unsqueeze(1)
            ban[:, -1] = (pending > 0) | (frames < min_frames)
            logits = logits.masked_fill(ban, float("-inf"))
            if median:  # the end hazard is read only where the end is allowed (after a sound)
                free = ~ban[:, -1]
                stopped, new_survival = median_stop(logits, logits.shape[1] - 1, survival)
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
            h, cache, mask, pos = m._advance(
                twice(m.lm.get_input_embeddings()(m.answer_vocab[choice]).unsqueeze(1), cfg_scale),
                cache, mask, pos,
            )
        return [out[i, : int(frames[i])].unsqueeze(0).cpu() for i in range(b)]
