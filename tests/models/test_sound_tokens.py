"""Tokens mode on a text-only causal LM: codes -> sound tokens, real speech -> the same tokens, CTC.

A tiny random Gemma 3 (``Gemma3ForCausalLM``, 2 layers, H = 32) with a locally trained tokenizer stands
in for ``google/gemma-3-1b-it``; a tiny random Gemma 4 audio tower saved to a folder is the stage-1
encoder and an untrained ``ResidualVQ`` the stage-1 quantizer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from demo.tiny import (
    gemma3_lm_debug_config,  # noqa: E402
    save_gemma4_audio_debug,  # noqa: E402
    train_tokenizer,  # noqa: E402
)
from models.chat_format import IGNORE_INDEX  # noqa: E402
from models.codec import codes_to_string, frames_to_string, string_to_frames  # noqa: E402
from models.encoders import Gemma4AudioEncoder  # noqa: E402
from models.rvq import ResidualVQ  # noqa: E402
from models.spoken_llm import SpokenLLM  # noqa: E402

Q, K = 2, 16
TEXTS = ["zero one two three four five six seven eight nine", "What comes after three? four. Listen:"] * 20


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("gemma3")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gemma3_lm_debug_config(len(tok), hidden_size=32)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make(path, **kw) -> SpokenLLM:
    kw = {"sound_levels": Q, **kw}
    return SpokenLLM(model=str(path), input_mode="tokens", dtype="fp32", num_levels=Q, codebook_size=K,
                     lora_r=4, lora_alpha=8, lora_dropout=0.0, **kw)  # fmt: skip


def sound_codes(m: SpokenLLM, ids: torch.Tensor) -> np.ndarray:
    """The codes written in a row of ids (its one contiguous run of sound tokens)."""
    sound = torch.isin(ids, torch.tensor(m.new_token_ids))
    idx = sound.nonzero().flatten()
    assert len(idx) and (idx[-1] - idx[0] + 1) == len(idx), "sound tokens must form one run"
    return m.sound.codes("".join(m.tokenizer.convert_ids_to_tokens(ids[sound].tolist())))


def test_frames_string_round_trips_and_level0_is_ichigo():
    rng = np.random.default_rng(0)
    codes = np.repeat(rng.integers(0, 2048, size=(3, 12)), rng.integers(1, 5, size=12), axis=1)
    codes[:, 5:60] = codes[:, 5:6]  # a run longer than one duration token
    for compress in (False, True):
        s = frames_to_string(codes, compress=compress)
        np.testing.assert_array_equal(string_to_frames(s, num_levels=3), codes)
        assert frames_to_string(codes[:1], compress=compress) == codes_to_string(codes[0], compress=compress)
    assert len(frames_to_string(codes, compress=True)) < len(frames_to_string(codes))
    assert frames_to_string(codes[:, :1]) == "<|sound_start|>" + "".join(
        f"<|sound_{'' if q == 0 else f'l{q}_'}{codes[q, 0]:04d}|>" for q in range(3)) + "<|sound_end|>"  # fmt: skip
    with pytest.raises(ValueError, match="levels"):
        string_to_frames(frames_to_string(codes)[: -len("<|sound_l2_0000|><|sound_end|>")] + "<|sound_end|>", num_levels=3)


def test_gemma3_tokens_mode_writes_codes_as_interleaved_sound_tokens(lm_path):
    m = make(lm_path)
    assert type(m.base).__name__ == "Gemma3ForCausalLM"
    assert len(m.new_token_ids) == 2 + Q * K  # start/end + one token per code per level
    codes = torch.randint(0, K, (Q, 7), generator=torch.Generator().manual_seed(0))
    ex = m.example(instruction_text="Listen:", codes=codes, response="four")
    assert "codes" not in ex  # the codes are in input_ids now
    assert int(torch.isin(ex["input_ids"], torch.tensor(m.new_token_ids)).sum()) == Q * 7 + 2
    np.testing.assert_array_equal(sound_codes(m, ex["input_ids"]), codes.numpy())
    labelled = ex["labels"] != IGNORE_INDEX
    assert m.tokenizer.decode(ex["input_ids"][labelled], skip_special_tokens=True) == "four"
    # Level 0 only: Ichigo's string, T + 2 tokens.
    one = make(lm_path, sound_levels=1)
    ex1 = one.example(instruction_text=None, codes=codes, response="four")
    np.testing.assert_array_equal(sound_codes(one, ex1["input_ids"]), codes[:1].numpy())
    with pytest.raises(ValueError, match="not codes"):
        m({**ex, "input_ids": ex["input_ids"][None], "labels": ex["labels"][None], "codes": codes[None]})
    with pytest.raises(ValueError, match="codes outside"):
        m.example(instruction_text=None, codes=torch.full((Q, 3), K), response="x")


def test_real_speech_becomes_the_tokens_of_its_stage1_codes(lm_path, tmp_path):
    m = make(lm_path)
    encoder = Gemma4AudioEncoder(source=str(save_gemma4_audio_debug(tmp_path / "enc")), level_db=-20.0)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=encoder.dim, num_quantizers=Q, codebook_size=K, kmeans_init=False)
    m.attach_rvq(rvq)
    with pytest.raises(RuntimeError, match="attach_encoder"):
        m.prompts_from_audio([np.zeros(8000, np.float32)])
    m.attach_encoder(encoder)
    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    waves = [(0.1 * np.sin(2 * np.pi * f * t[:n]) + 0.01 * rng.standard_normal(n)).astype(np.float32)
             for f, n in ((150, 9_600), (260, 16_000))]  # fmt: skip
    batch = m.prompts_from_audio(waves, instruction_text="Listen:")
    assert set(batch) == {"input_ids", "labels", "attention_mask", "audio_positions"}  # text only: no features
    for row, mask, w in zip(batch["input_ids"], batch["attention_mask"], waves, strict=True):
        out = encoder(torch.from_numpy(w)[None])
        want = rvq.encode(out.states, out.mask)[0]
        got = sound_codes(m, row[mask.bool()])
        assert got.shape == (Q, int(encoder.num_frames(torch.tensor([len(w)]))[0]))
        np.testing.assert_array_equal(got, want.numpy())
    # The stage-1 encoder's level normalisation applies: a louder recording writes the same tokens.
    louder = m.prompts_from_audio([w * 4 for w in waves], instruction_text="Listen:")
    assert torch.equal(louder["input_ids"], batch["input_ids"])
    # A recording cut in pieces is heard whole, its codes in order.
    pieces = m.prompts_from_audio([waves[1][:8000], waves[1][8000:]], pieces_per_item=[2])
    assert sound_codes(m, pieces["input_ids"][0]).shape[1] == 2 * int(encoder.num_frames(torch.tensor([8000]))[0])
    answers = m.generate(batch, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_ctc_over_sound_tokens_is_in_the_loss_and_trains_alone(lm_path):
    m = make(lm_path, ctc_weight=0.5).train()
    codes = torch.randint(0, K, (Q, 9), generator=torch.Generator().manual_seed(1))
    ex = m.example(instruction_text=None, codes=codes, response="four")
    batch = {k: v[None] for k, v in ex.items()}
    with pytest.raises(ValueError, match="ctc_targets"):
        m(batch)  # a silent no-op is what this guards against
    batch["ctc_targets"] = m.ctc_targets("three")[None]
    out = m(batch)
    assert torch.isfinite(out["ctc"]) and out["ctc"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * out["ctc"])
    # The CTC term alone (no labelled token: ce = 0) reaches the trainable weights.
    alone = m({**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)})
    assert alone["ce"] == 0 and alone["loss"] > 0
    alone["loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "trainable_tokens" in n)
