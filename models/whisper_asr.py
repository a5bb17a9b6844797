"""A frozen Whisper decoder that transcribes given encoder states: stage 2's intelligibility metric.

When stage 1 quantizes a Whisper encoder's states (the Ichigo / Homebrew Speechless setup), the
stage-1 RVQ decodes semantic tokens back into that encoder's space, and the frozen Whisper decoder
can read them as its cross-attention input. Transcribing the RVQ decode of the *real* speech's codes
gives the tokenizer's own WER (what Ichigo reports for its WhisperVQ); transcribing the decode of
stage 2's *generated* codes says whether the synthetic speech is intelligible, beside it.

What the decoder expects, and how the states are brought to it (:meth:`WhisperASR.transcribe_states`):

- **The full window.** Whisper's encoder always sees a 30 s window (``max_source_positions`` =
  1500 frames at 50 frames/s), and its decoder was trained on all of it; stage-1 states stop at the
  audio's end. The missing frames are filled with ``padding``: ``"silence"`` (default) takes the
  model's own encoder states of a silent window at the same frame positions, ``"zeros"`` pads with
  zeros (the decoder has never seen a zero state: it hallucinates or stops early; see the figures
  in ``benchmarks/bench_whisper_asr.py``).
- **Frame rate.** A stage-1 encoder with ``pooling=2`` (25 frames/s, mean of frame pairs) is undone by
  repeating each frame twice (``pooling`` here); the pairs' detail is lost, the order and timing are
  not.
- **Longer than a window.** States longer than the window are transcribed window by window and the
  texts joined with a space.

Decoding is greedy with a KV cache, batched: the prompt is ``<|startoftranscript|>`` (plus
``<|lang|><|transcribe|>`` for a multilingual model) and ``<|notimestamps|>``; the generation config's
``suppress_tokens`` are never emitted, its ``begin_suppress_tokens`` not first, and no special token
other than end-of-text is ever emitted. A row stops at end-of-text, at ``max_new_tokens``, or at
``max_tokens_per_second`` of its real frames (a garbled input otherwise repeats itself to the
token limit, which is what made a long generated set slow to score).
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutput

__all__ = ["WhisperASR"]

_FRAMES_PER_SECOND = 50.0  # Whisper's encoder output rate (mel hop 160 x conv stride 2 at 16 kHz)
# transformers renamed the forward's ``past_key_values`` to ``cache`` (5.2x); take whichever it has.
_CACHE_ARG = "cache" if "cache" in inspect.signature(WhisperForConditionalGeneration.forward).parameters else "past_key_values"


class WhisperASR(nn.Module):
    """Frozen ``WhisperForConditionalGeneration``: encoder states ``[B, T, D]`` -> transcripts.

    The network is held unregistered (like :class:`models.encoders.FrozenEncoder`'s), so it never
    enters a parent's ``state_dict``, optimiser or checkpoint; ``.to()`` reaches it.

    Args:
        source: local folder (or hub id) of a Whisper model with its tokenizer and feature extractor
            (``save_pretrained`` of the model, ``WhisperFeatureExtractor`` and tokenizer).
        pooling: frames of the given states per Whisper frame: 2 undoes a stage-1 encoder's
            ``pooling=2`` by repeating frames.
        padding: what fills the window past the real frames: ``"silence"`` (the model's own encoder
            states of a silent window) or ``"zeros"``.
        language: Whisper language code of the prompt for a multilingual model (ignored by an
            English-only one).
        max_new_tokens: token limit per window (224: half of Whisper's 448 positions, its own
            default limit for a 30 s window).
        max_tokens_per_second: token limit per second of real frames (at least 4 tokens per row).
        batch_size: windows decoded at once.
    """

    def __init__(
        self,
        *,
        source: str,
        pooling: int = 1,
        padding: Literal["silence", "zeros"] = "silence",
        language: str = "en",
        max_new_tokens: int = 224,
        max_tokens_per_second: float = 8.0,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        if pooling not in (1, 2):
            raise ValueError(f"pooling must be 1 or 2, got {pooling}")
        if padding not in ("silence", "zeros"):
            raise ValueError(f"padding must be 'silence' or 'zeros', got {padding!r}")
        if max_new_tokens < 1 or batch_size < 1 or max_tokens_per_second <= 0:
            raise ValueError("max_new_tokens, batch_size and max_tokens_per_second must be positive")
        model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
        model.requires_grad_(False).eval()
        object.__setattr__(self, "_model", model)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.extractor = WhisperFeatureExtractor.from_pretrained(source)
        self.source, self.pooling, self.padding, self.language = str(source), pooling, padding, language
        self.max_new_tokens, self.max_tokens_per_second, self.batch_size = (
            max_new_tokens, max_tokens_per_second, batch_size,
        )
        self.window = int(model.config.max_source_positions)
        self.prompt, self.eos_id, self.banned, self.banned_first = _decoding_rules(model, self.tokenizer, language)
        self._silence: Tensor | None = None

    # ---- the hidden network -----------------------------------------------------------------------
    @property
    def model(self) -> WhisperForConditionalGeneration:
        return self._model

    def _apply(self, fn, recurse: bool = True) -> WhisperASR:
        super()._apply(fn, recurse)
        self._model._apply(fn, recurse)
        self._silence = None
        return self

    def train(self, mode: bool = True) -> WhisperASR:
        super().train(False)  # frozen: dropout would change the transcripts
        self._model.eval()
        return self

    @property
    def dim(self) -> int:
        return int(self._model.config.d_model)

    @property
    def device(self) -> torch.device:
        return self._model.proj_out.weight.device

    # ---- states -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, audio: list[Tensor]) -> Tensor:
        """Full-window encoder states ``[B, W, D]`` of 16 kHz clips (each at most one window long)."""
        feats = self.extractor([a.float().cpu().numpy() for a in audio], sampling_rate=16000,
                               padding="max_length", return_tensors="pt")["input_features"]
        return self._model.get_encoder()(feats.to(self.device)).last_hidden_state

    def silence(self) -> Tensor:
        """``[W, D]`` encoder states of a silent window (computed once per device)."""
        if self._silence is None:
            self._silence = self.encode([torch.zeros(self.extractor.n_samples)])[0]
        return self._silence

    def windows(self, states: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Stage-1 states -> full Whisper windows.

        Args:
            states: ``[B, T, D]`` states at ``50 / pooling`` frames/s; frames past ``lengths`` ignored.
            lengths: ``[B]`` real frames per item.

        Returns:
            ``windows [N, W, D]`` (frames past the real ones filled with ``padding``), ``frames [N]``
            real Whisper frames per window, and ``owner [N]``: the item each window belongs to (an
            item longer than a window spans several, in order).
        """
        if states.shape[-1] != self.dim:
            raise ValueError(f"states are {states.shape[-1]}-dim but the Whisper decoder reads {self.dim}")
        pad = self.silence() if self.padding == "silence" else states.new_zeros(self.window, self.dim)
        out, frames, owner = [], [], []
        for b, n in enumerate(torch.as_tensor(lengths).tolist()):
            x = states[b, : int(n)].to(self.device, torch.float32)
            if self.pooling > 1:
                x = x.repeat_interleave(self.pooling, dim=0)
            for start in range(0, max(x.shape[0], 1), self.window):
                piece = x[start : start + self.window]
                w = pad.clone()
                w[: piece.shape[0]] = piece
                out.append(w)
                frames.append(piece.shape[0])
                owner.append(b)
        return torch.stack(out), torch.tensor(frames), owner

    # ---- transcription ----------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe_states(self, states: Tensor, lengths: Tensor) -> list[str]:
        """Transcripts of ``B`` items of encoder states (see the module docstring).

        Args:
            states: ``[B, T, D]`` float states of the Whisper encoder this decoder belongs to.
            lengths: ``[B]`` real frames per item (at the states' rate).

        Returns:
            ``B`` transcripts (special tokens removed, surrounding space stripped).
        """
        if states.shape[0] == 0:
            return []
        windows, frames, owner = self.windows(states, lengths)
        texts: list[str] = []
        for start in range(0, windows.shape[0], self.batch_size):
            texts += self.decode(windows[start : start + self.batch_size], frames[start : start + self.batch_size])
        joined = [[] for _ in range(states.shape[0])]
        for b, text in zip(owner, texts, strict=True):
            if text:
                joined[b].append(text)
        return [" ".join(parts) for parts in joined]

    @torch.no_grad()
    def transcribe_audio(self, audio: list[Tensor]) -> list[str]:
        """Reference transcripts of clips (at most one window each) through Whisper's own encoder."""
        states = self.encode(audio)
        frames = torch.tensor([min(self.window, -(-a.shape[0] // 320)) for a in audio])
        return self.decode(states, frames)

    @torch.no_grad()
    def decode(self, windows: Tensor, frames: Tensor) -> list[str]:
        """Greedy transcripts of full windows ``[N, W, D]``; ``frames [N]`` sets each row's token budget."""
        model, dev = self._model, self.device
        n = windows.shape[0]
        enc = BaseModelOutput(last_hidden_state=windows.to(dev, torch.float32))
        budget = (frames.float() / _FRAMES_PER_SECOND * self.max_tokens_per_second).ceil().long()
        budget = budget.clamp(min=4, max=self.max_new_tokens).to(dev)
        limit = min(self.max_new_tokens, int(model.config.max_target_positions) - len(self.prompt))
        ids = torch.tensor([self.prompt] * n, device=dev)
        out = model(encoder_outputs=enc, decoder_input_ids=ids, use_cache=True)
        cache, logits = _cache_of(out), out.logits[:, -1]
        tokens = torch.full((n, max(limit, 0)), self.eos_id, dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        banned, banned_first = self.banned.to(dev), self.banned_first.to(dev)
        for step in range(limit):
            logits = logits.float().index_fill(1, banned, float("-inf"))
            if step == 0:
                logits = logits.index_fill(1, banned_first, float("-inf"))
            choice = torch.where(done | (step >= budget), self.eos_id, logits.argmax(-1))
            tokens[:, step] = choice
            done = done | (choice == self.eos_id)
            if bool(done.all()):
                break
            out = model(encoder_outputs=enc, decoder_input_ids=choice[:, None], use_cache=True, **{_CACHE_ARG: cache})
            cache, logits = _cache_of(out), out.logits[:, -1]
        texts = []
        for row in tokens.tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts


def _cache_of(out):
    return out["cache"] if "cache" in out else out.past_key_values


def _decoding_rules(model: WhisperForConditionalGeneration, tokenizer, language: str) -> tuple[list[int], int, Tensor, Tensor]:
    """Prompt ids, end-of-text id, ids never emitted, ids not emitted first (from the model's configs)."""
    gen, cfg = model.generation_config, model.config
    ids = tokenizer.convert_tokens_to_ids

    def first(*values):
        return next((int(v) for v in values if v is not None), None)

    start = first(getattr(gen, "decoder_start_token_id", None), cfg.decoder_start_token_id, ids("<|startoftranscript|>"))
    eos = getattr(gen, "eos_token_id", None)
    eos = first(eos[0] if isinstance(eos, list) else eos, cfg.eos_token_id)
    multilingual = getattr(gen, "is_multilingual", None)
    if multilingual is None:
        multilingual = cfg.vocab_size >= 51865  # Whisper's own rule: the .en models have 51864 ids
    prompt = [start]
    if multilingual:
        lang_to_id = getattr(gen, "lang_to_id", None) or {}
        lang = lang_to_id.get(f"<|{language}|>", ids(f"<|{language}|>"))
        if lang is None or lang == tokenizer.unk_token_id:
            raise ValueError(f"the Whisper model has no language token <|{language}|>")
        prompt += [int(lang), int(getattr(gen, "task_to_id", {}).get("transcribe", ids("<|transcribe|>")))]
    no_ts = first(getattr(gen, "no_timestamps_token_id", None), ids("<|notimestamps|>"))
    if no_ts is not None and no_ts != tokenizer.unk_token_id:
        prompt.append(no_ts)
    # Special tokens (task, language, timestamps, ...) never belong in a transcript; ids past the
    # tokenizer (timestamp tokens of a tokenizer that lists none) neither.
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    vocab = int(cfg.vocab_size)
    banned = (special | set(range(len(tokenizer), vocab)) | set(getattr(gen, "suppress_tokens", None) or [])) - {eos}
    banned_first = set(getattr(gen, "begin_suppress_tokens", None) or []) | {eos}
    keep = lambda s: torch.tensor(sorted(i for i in s if 0 <= i < vocab), dtype=torch.long)  # noqa: E731
    return prompt, eos, keep(banned), keep(banned_first)


