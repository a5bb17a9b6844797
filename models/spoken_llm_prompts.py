"""``SpokenLLM``'s examples and prompts, and greedy generation with the audio injected into the prefill.

Training examples (``example``) and generation prompts (``prompts_from_text``, ``prompts_from_audio``)
are written in the model's chat template with the audio as its input mode reads it: audio slots
(embeddings: native or projector) or sound tokens (tokens). See ``models/spoken_llm.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from models.chat_format import build_example, build_prompt, collate_padded
from models.encoders.base import level_gain
from models.sound_tokens import speech_to_codes

__all__ = ["PromptsAndGeneration"]


class PromptsAndGeneration:
    """Examples, prompts and ``generate`` of :class:`models.spoken_llm.SpokenLLM` (a mixin)."""

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
            n = self.projector.num_positions(self.decoded_frames(int(codes.shape[-1])))
            text = self._with_sound(instruction_text, self._audio_block(n))
            ex = build_example(self.tokenizer, instruction_text=text, audio_frames=None, response=response)
            return {**self._mark_audio(ex, n), "codes": codes}
        ex = build_example(self.tokenizer, instruction_text=instruction_text, audio_frames=self.decoded_frames(int(codes.shape[-1])),
                           response=response)  # fmt: skip
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
            # ceil(T / k) per item, T counted after the stage-1 round trip (which may decode at a higher rate)
            slots = [self.projector.num_positions(self.decoded_frames(n)) for n in lengths.tolist()]
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
