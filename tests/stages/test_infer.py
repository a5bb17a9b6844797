"""Inference on long audio: recordings over the 30 s window are heard whole, not truncated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.audio import split_at_silence


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from models.gemma4_tiny import build_tiny_gemma4
    from models.spoken_llm import SpokenLLM

    path = build_tiny_gemma4(tmp_path_factory.mktemp("gemma4"), seed=0)
    torch.manual_seed(0)
    return SpokenLLM(model=str(path), dtype="fp32", lora_r=2, num_levels=2, codebook_size=8)


def test_long_audio_fills_one_block_with_every_frame(tiny_llm):
    rng = np.random.default_rng(0)
    seconds = 41.0
    wave = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    wave[int(20 * 16000) : int(20.5 * 16000)] = 0.0  # a pause to cut at
    short = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    pieces = [wave[a:b] for a, b in split_at_silence(wave, 16000, max_seconds=30.0)]
    assert len(pieces) == 2 and sum(len(p) for p in pieces) == len(wave)
    batch = tiny_llm.prompts_from_audio([*pieces, short], pieces_per_item=[len(pieces), 1])
    audio_id = tiny_llm.base.config.audio_token_id
    per_row = (batch["input_ids"] == audio_id).sum(1).tolist()
    assert abs(per_row[0] - seconds * 25) <= 3, per_row  # 25 frames/s over the whole 41 s
    assert abs(per_row[1] - 25) <= 2
    answers = tiny_llm.generate(batch, max_new_tokens=2)
    assert len(answers) == 2


def test_pieces_must_match_waveforms(tiny_llm):
    with pytest.raises(ValueError, match="pieces_per_item"):
        tiny_llm.prompts_from_audio([np.zeros(16000, np.float32)], pieces_per_item=[2])


def test_repeat_is_an_open_task_scored_by_wer_with_the_language_s_normaliser():
    from datamodules.instructions import CLOSED_TASKS, OPEN_TASKS
    from stages.infer import score

    assert "repeat" in OPEN_TASKS and "next_digit" not in OPEN_TASKS
    assert CLOSED_TASKS["repeat"]("  the  cat sat ") == "the cat sat"
    with pytest.raises(ValueError, match="empty"):
        CLOSED_TASKS["repeat"]("   ")
    # Twi keeps its letters under the basic normaliser; English gets Whisper's English one.
    assert score(["ɔkɔɔ fie"], ["Ɔkɔɔ fie!"], mode="transcription", language="tw") == {"wer": 0.0, "cer": 0.0}
    assert score(["it is ten dollars"], ["It's $10."], mode="transcription", language="en")["wer"] == 0.0
    assert score(["the cat"], ["the cat sat"], mode="transcription", language="tw")["wer"] == pytest.approx(1 / 3)
