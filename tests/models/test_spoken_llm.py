"""Stage-3 model side: chat format, packing, SpokenLLM in both input modes, checkpoints and export.

A tiny random Gemma 4 (``demo.tiny``) stands in for ``google/gemma-4-E4B-it`` and a sum of Q
embedding tables stands in for the stage-1 RVQ, so everything runs on the CPU in seconds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Gemma4ForConditionalGeneration  # noqa: E402

from demo.tiny import save_gemma4_llm_debug  # noqa: E402
from models.chat_format import (  # noqa: E402
    IGNORE_INDEX,
    audio_token_count,
    build_example,
    build_prompt,
    collate_packed,
    collate_padded,
    pack_examples,
)
from models.spoken_llm import SpokenLLM  # noqa: E402

Q, K, D = 2, 16, 32  # RVQ levels, codebook size, encoder dim (the tiny audio tower's hidden size)


class SumRVQ(nn.Module):
    """Stand-in RVQ: ``decode`` sums one embedding per level; ``encode`` picks the nearest per level."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.tables = nn.ModuleList(nn.Embedding(K, D) for _ in range(Q))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # [B, Q, T] -> [B, T, D]
        return sum(t(codes[:, q]) for q, t in enumerate(self.tables))

    def encode(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, Q, T]
        codes = torch.stack([torch.cdist(states, t.weight[None]).argmin(-1) for t in self.tables], 1)
        return codes if mask is None else codes.masked_fill(~mask[:, None], -1)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_gemma4_llm_debug(tmp_path_factory.mktemp("tiny_gemma4"), seed=0)


def make(path, mode="embeddings", **kw) -> SpokenLLM:
    m = SpokenLLM(
        model=str(path), input_mode=mode, dtype="fp32", num_levels=Q, codebook_size=K,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, **kw,
    )  # fmt: skip
    if mode == "embeddings":
        m.attach_rvq(SumRVQ())
    return m


def codes_batch(m: SpokenLLM, frames: int, response: str, seed: int = 0) -> dict:
    ex = build_example(m.tokenizer, instruction_text=None, audio_frames=frames, response=response)
    batch = collate_padded([ex], pad_id=m.pad_id)
    batch["codes"] = torch.randint(0, K, (1, Q, frames), generator=torch.Generator().manual_seed(seed))
    return batch


def tokens_batch(m: SpokenLLM, response: str) -> dict:
    sound = "<|sound_start|><|sound_0003|><|sound_0011|><|sound_0007|><|sound_end|>"
    return collate_padded([build_example(m.tokenizer, instruction_text=sound, audio_frames=None, response=response)],
                          pad_id=m.pad_id)  # fmt: skip


def train(m: SpokenLLM, batch: dict, steps: int = 12) -> list[float]:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
    m.train()
    losses = []
    for _ in range(steps):
        out = m(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out["loss"].item())
    m.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tiny_path):
    """One model per input mode, trained a few steps on one example (shared: training costs the most)."""
    out = {}
    for mode in ("embeddings", "tokens"):
        m = make(tiny_path, mode)
        batch = codes_batch(m, 6, "Accra") if mode == "embeddings" else tokens_batch(m, "Accra")
        out[mode] = (m, batch, train(m, batch))
    return out


# ----------------------------------------------------------------------------------------- chat format
def test_labels_cover_only_response_and_end_of_turn(tiny_path):
    m = make(tiny_path)
    tok = m.tokenizer
    for text, frames in (("What is the capital?", None), (None, 7), ("Answer:", 3)):
        ex = build_example(
            tok, instruction_text=text, audio_frames=frames, response="Accra is it", system="Be brief."
        )
        labelled = ex["labels"] != IGNORE_INDEX
        assert torch.equal(ex["labels"][labelled], ex["input_ids"][labelled])
        assert tok.decode(ex["input_ids"][labelled]) == "Accra is it<turn|>"
        # Labels are one contiguous run right after the generation prompt.
        prompt = build_prompt(tok, instruction_text=text, audio_frames=frames, system="Be brief.")
        n = prompt["input_ids"].numel()
        assert torch.equal(ex["input_ids"][:n], prompt["input_ids"])
        assert labelled[n:].int().argmin() > 0 and not labelled[:n].any()
        assert int(ex["audio_positions"].sum()) == (frames or 0)
        if frames:
            ids = ex["input_ids"].tolist()
            first = ids.index(tok.convert_tokens_to_ids("<|audio|>"))
            assert ids[first - 1] == tok.convert_tokens_to_ids("<|audio>")
            assert ids[first + frames] == tok.convert_tokens_to_ids("<audio|>")
    with pytest.raises(ValueError):
        build_example(tok, instruction_text=None, audio_frames=None, response="x")


def test_pack_examples_keeps_every_example_whole_and_rejects_too_long(tiny_path):
    tok = make(tiny_path).tokenizer
    exs = [
        build_example(tok, instruction_text="q" * (i + 1), audio_frames=i % 3 + 1, response="a b")
        for i in range(7)
    ]
    packs = pack_examples(exs, max_tokens=80)
    assert sorted(i for p in packs for i in p["indices"]) == list(range(7))
    for p in packs:
        assert p["input_ids"].numel() <= 80
        starts = (p["position_ids"] == 0).nonzero().flatten().tolist()
        assert starts == np.cumsum([0, *p["lengths"][:-1]]).tolist()
        assert torch.equal(p["input_ids"], torch.cat([exs[i]["input_ids"] for i in p["indices"]]))
    with pytest.raises(ValueError, match="exceed max_tokens"):
        pack_examples(exs, max_tokens=10)


def test_packing_never_lets_one_example_attend_to_another(tiny_path):
    m = make(tiny_path).eval()
    tok = m.tokenizer
    a = build_example(tok, instruction_text="Hi there", audio_frames=4, response="one two")
    a2 = build_example(tok, instruction_text="Wo ho te sen", audio_frames=4, response="three")
    b = build_example(tok, instruction_text="capital", audio_frames=5, response="Accra")
    codes_a = torch.randint(0, K, (1, Q, 4))
    codes_b = torch.randint(0, K, (1, Q, 5))

    def logits_of_b(first, first_codes):
        pack = collate_packed(pack_examples([first, b], max_tokens=200), pad_id=m.pad_id)
        assert pack["input_ids"].shape[0] == 1
        order = pack_examples([first, b], max_tokens=200)[0]["indices"]
        codes = [first_codes, codes_b] if order == [0, 1] else [codes_b, first_codes]
        width = max(c.shape[-1] for c in codes)
        pack["codes"] = torch.cat([nn.functional.pad(c, (0, width - c.shape[-1])) for c in codes])
        pack["code_lengths"] = torch.tensor([c.shape[-1] for c in codes])
        with torch.no_grad():
            logits = m(pack, return_logits=True)["logits"][0]
        start = 0 if order[0] == 1 else first["input_ids"].numel()
        return logits[start : start + b["input_ids"].numel()]

    with torch.no_grad():
        alone = m({**collate_padded([b], pad_id=m.pad_id), "codes": codes_b}, return_logits=True)["logits"][0]
    packed = logits_of_b(a, codes_a)
    changed = logits_of_b(a2, torch.randint(0, K, (1, Q, 4)))  # other tokens and audio in the neighbour
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(changed, alone, atol=1e-4, rtol=1e-4)



def test_packing_in_the_tokens_path_keeps_each_example_alone(tiny_path):
    m = make(tiny_path, "tokens").eval()
    tok = m.tokenizer
    sound = lambda codes: m.sound.text(torch.tensor(codes))  # noqa: E731
    a = m.example(instruction_text="Hi", codes=torch.tensor([[3, 11, 7, 7]] * Q), response="one two")
    b = m.example(instruction_text=None, codes=torch.tensor([[5, 1, 2]] * Q), response="Accra")
    a2 = build_example(tok, instruction_text="plain " + sound([[9, 9, 1]] * Q), audio_frames=None, response="x")
    assert torch.isin(b["input_ids"], torch.tensor(m.new_token_ids)).any()  # b's sound tokens are in its ids
    with torch.no_grad():
        alone = m(collate_padded([b], pad_id=m.pad_id), return_logits=True)["logits"][0]
        for first in (a, a2):
            packs = pack_examples([first, b], max_tokens=400)
            assert len(packs) == 1
            batch = collate_packed(packs, pad_id=m.pad_id)
            start = 0 if packs[0]["indices"][0] == 1 else first["input_ids"].numel()
            assert "attention_mask" not in batch and batch["position_ids"][0, start] == 0
            logits = m(batch, return_logits=True)["logits"][0]
            torch.testing.assert_close(logits[start : start + b["input_ids"].numel()], alone, atol=1e-4, rtol=1e-4)


def test_levelled_packing_fills_as_few_rows_and_ends_them_level(tiny_path):
    tok = make(tiny_path).tokenizer
    exs = [build_example(tok, instruction_text="q " * (3 * i % 11 + 1), audio_frames=None, response="a") for i in range(23)]
    lengths = [e["input_ids"].numel() for e in exs]
    cap = 3 * max(lengths)
    plain, level = pack_examples(exs, cap), pack_examples(exs, cap, balance=True)
    for packs in (plain, level):
        assert sorted(i for p in packs for i in p["indices"]) == list(range(23))
        assert all(p["input_ids"].numel() <= cap for p in packs)
    assert len(level) == len(plain)
    rows = lambda packs: [p["input_ids"].numel() for p in packs]  # noqa: E731
    assert max(rows(level)) - min(rows(level)) <= max(lengths)
    real = lambda packs: sum(lengths) / (len(packs) * max(rows(packs)))  # noqa: E731
    assert real(level) >= real(plain) and real(level) > 0.9

# ------------------------------------------------------------------------------------- SpokenLLM paths
def test_codes_path_equals_decode_output_proj_embedder(tiny_path):
    m = make(tiny_path).eval()
    hf = m.base.model  # Gemma4Model
    codes = torch.randint(0, K, (2, Q, 5))
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        manual = hf.embed_audio(inputs_embeds=hf.audio_tower.output_proj(m.rvq.decode(codes)))
        manual = torch.cat([manual[0, :5], manual[1, :3]])
        got = m.embed_codes(codes, lengths)
        torch.testing.assert_close(got, manual)
        # ... and those are the vectors the LLM sees at the audio slots.
        b = collate_padded([build_example(m.tokenizer, instruction_text=None, audio_frames=n, response="x")
                            for n in (5, 3)], pad_id=m.pad_id)  # fmt: skip
        inputs, positions = m._inputs({**b, "codes": codes, "code_lengths": lengths})
        torch.testing.assert_close(inputs["inputs_embeds"][positions], manual)
    with pytest.raises(ValueError, match="audio slots"):
        m(codes_batch(m, 4, "x") | {"codes": torch.zeros(1, Q, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="codes outside"):
        m.embed_codes(torch.full((1, Q, 2), K))
    # The real RVQ pads with -1: without lengths, those frames are left out.
    padded = codes.clone()
    padded[1, :, 3:] = -1
    with torch.no_grad():
        torch.testing.assert_close(m.embed_codes(padded), manual)


def test_real_audio_path_matches_gemma4_native_audio_input(tiny_path):
    m = make(tiny_path).eval()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8_000, 20_800)]
    batch = m.prompts_from_audio(waves, instruction_text="Answer the question.")
    assert batch["audio_positions"].sum(1).tolist() == [audio_token_count(len(w)) for w in waves] == [13, 33]
    with torch.no_grad():
        ours = m({**batch, "labels": batch["labels"]}, return_logits=True)["logits"]
        native = m.peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            input_features=batch["input_features"], input_features_mask=batch["input_features_mask"],
        ).logits  # fmt: skip
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], native[keep], atol=1e-4, rtol=1e-4)
    answers = m.generate(batch, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # The RVQ round trip changes what the LLM hears (the stand-in RVQ is lossy) but keeps the shapes.
    assert len(m.generate({**batch, "rvq_round_trip": True}, max_new_tokens=2)) == 2


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_both_modes_train_and_generate(trained, mode):
    m, batch, losses = trained[mode]
    assert losses[-1] < 0.5 * losses[0], losses
    if mode == "embeddings":
        prompt = collate_padded([build_prompt(m.tokenizer, instruction_text=None, audio_frames=6)],
                                pad_id=m.pad_id, side="left")  # fmt: skip
        prompt["codes"] = batch["codes"]
    else:
        prompt = ["<|sound_start|><|sound_0003|><|sound_0011|><|sound_0007|><|sound_end|>"]
    answer = m.generate(prompt, max_new_tokens=8)
    assert answer == ["Accra"]
    # Greedy generate agrees with the argmax of a plain forward pass at the first answer position.
    labelled = (batch["labels"][0] != IGNORE_INDEX).nonzero()[0, 0]
    with torch.no_grad():
        logits = m(batch, return_logits=True)["logits"][0, labelled - 1]
    assert m.tokenizer.decode([int(logits.argmax())]) == "A"


def test_tokens_mode_trains_only_new_token_rows(trained):
    m, _, _ = trained["tokens"]
    base = m.base.get_input_embeddings()
    assert len(m.new_token_ids) == K + 2 and min(m.new_token_ids) >= 269  # appended after the tiny vocab
    frozen = [n for n, p in m.named_parameters() if "embed_tokens" in n and p.requires_grad]
    assert frozen and all("trainable_tokens_delta" in n for n in frozen)
    assert any(not p.requires_grad for n, p in m.named_parameters() if "embed_tokens" in n)
    assert base.weight.shape[0] == len(m.tokenizer)
    delta = dict(m.named_parameters())[frozen[0]]
    assert delta.shape[0] == len(m.new_token_ids) and delta.abs().sum() > 0


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_trainable_state_dict_round_trip(tiny_path, trained, mode):
    m, batch, _ = trained[mode]
    sd = m.trainable_state_dict()
    assert sd and all("lora_" in k or "trainable_tokens" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) < 0.2 * sum(p.numel() for p in m.parameters())
    fresh = make(tiny_path, mode).eval()
    with torch.no_grad():
        before = fresh(batch)["loss"]
        fresh.load_trainable_state_dict(sd)
        after, want = fresh(batch, return_logits=True), m(batch, return_logits=True)
    assert not torch.allclose(before, want["loss"])
    torch.testing.assert_close(after["logits"], want["logits"])
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict({k: v for k, v in list(sd.items())[1:]})


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_adapter_and_merged_export(tmp_path, trained, mode):
    m, batch, _ = trained[mode]
    adapter = m.save_adapter(tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    merged_dir = m.export_merged(tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = Gemma4ForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    prompt = m.prompts_from_text(["Hi there"] if mode == "embeddings" else
                                 ["<|sound_start|><|sound_0003|><|sound_0011|><|sound_0007|><|sound_end|>"])  # fmt: skip
    out = merged.generate(**prompt.__class__({k: prompt[k] for k in ("input_ids", "attention_mask")}),
                          max_new_tokens=8, do_sample=False, eos_token_id=m.stop_ids, pad_token_id=m.pad_id)  # fmt: skip
    text = m.tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == m.generate(prompt, max_new_tokens=8)[0]
    if mode == "tokens":
        assert text == "Accra"
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if mode == "embeddings":  # the merged model hears real audio natively; compare on a text turn
            ids = prompt["input_ids"]
            mask = prompt["attention_mask"]
        ours = m({"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, IGNORE_INDEX)},
                 return_logits=True)["logits"]  # fmt: skip
        torch.testing.assert_close(
            merged(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-3, rtol=1e-3
        )


def test_ctc_auxiliary_loss_reaches_lora(tiny_path):
    m = make(tiny_path, ctc_weight=0.5).train()
    batch = codes_batch(m, 8, "Accra")
    batch["ctc_targets"] = torch.tensor([m.tokenizer("Accra", add_special_tokens=False)["input_ids"]])
    out = m(batch)
    assert torch.isfinite(out["ctc"]) and out["ctc"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * out["ctc"])
    out["ctc"].backward()
    grads = [p.grad for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n]  # B starts at 0
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_real_audio_is_normalised_as_the_stage1_encoder_does(tiny_path):
    from models.encoders import Gemma4AudioEncoder

    m = make(tiny_path).eval()
    m.set_audio_normalization(level_db=-20.0, center_states=True)
    enc = Gemma4AudioEncoder(source=str(tiny_path), level_db=-20.0, center_states=True)  # the same audio tower
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8_000, 20_800)]
    batch = m.prompts_from_audio(waves)
    louder = m.prompts_from_audio([w * 5 for w in waves])
    torch.testing.assert_close(batch["input_features"], louder["input_features"], atol=1e-4, rtol=1e-4)
    states, valid = m.encoder_states(batch["input_features"], batch["input_features_mask"])
    ref = enc(torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True),
              torch.tensor([len(w) for w in waves]))
    assert valid.sum(1).tolist() == ref.lengths.tolist()
    for i, t in enumerate(ref.lengths.tolist()):
        torch.testing.assert_close(states[i, :t].float(), ref.states[i, :t], atol=1e-4, rtol=1e-4)
        assert states[i, :t].mean(0).abs().max() < 1e-4
    # Off again: the states are the raw tower's, no longer centered.
    m.set_audio_normalization()
    raw, _ = m.encoder_states(batch["input_features"], batch["input_features_mask"])
    assert raw[0, : ref.lengths[0]].mean(0).abs().max() > 1e-3


# ------------------------------------------------------------------------------ projector (any LLM)
WD, KS = 24, 4  # the stage-1 encoder's state width (a tiny Whisper's d_model), frames stacked per slot


class DimRVQ(SumRVQ):
    """The stand-in RVQ at another width (real RVQs expose ``dim``; the projector checks it)."""

    def __init__(self, dim: int = WD) -> None:
        nn.Module.__init__(self)
        torch.manual_seed(2)
        self.dim = dim
        self.tables = nn.ModuleList(nn.Embedding(K, dim) for _ in range(Q))


def tiny_whisper_encoder(dim: int = WD):
    from demo.tiny import whisper_debug_config
    from models.encoders import WhisperEncoder

    torch.manual_seed(0)
    config = whisper_debug_config(d_model=dim, encoder_layers=1, max_source_positions=50)
    return WhisperEncoder(config=config)  # a 1 s window (longer audio in pieces), 50 frames/s


@pytest.fixture(scope="module")
def gemma3_path(tmp_path_factory):
    """A tiny random Gemma 3 text LM (no audio tower) with a locally trained tokenizer."""
    from transformers import AutoModelForCausalLM

    from demo.tiny import gemma3_lm_debug_config, train_tokenizer

    path = tmp_path_factory.mktemp("tiny_gemma3")
    tok = train_tokenizer(["Accra is the capital", "one two three four five", "Answer the question."] * 20, vocab_size=300)
    torch.manual_seed(0)
    # Embeddings at a pretrained LM's scale: at init's 0.02 the frozen tied lm_head could not sharpen any
    # answer (every logit within ~1 of the others), whatever LoRA and the projector learn.
    config = gemma3_lm_debug_config(len(tok), hidden_size=32, initializer_range=0.2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_projected(path, **kw) -> SpokenLLM:
    args = dict(model=str(path), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=4, lora_alpha=8,
                lora_dropout=0.0, audio_dim=WD, projector_stack=KS)  # fmt: skip
    m = SpokenLLM(**{**args, **kw})
    m.attach_rvq(DimRVQ())
    return m


@pytest.fixture(scope="module")
def projected(gemma3_path):
    """A Gemma 3 + projector model trained on one spoken example (7 frames: not a multiple of k)."""
    m = make_projected(gemma3_path)
    codes = torch.randint(0, K, (Q, 7), generator=torch.Generator().manual_seed(3))
    batch = collate_instructions_([m.example(instruction_text="Answer the question.", codes=codes, response="Accra")], m)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    projector = {n: p.detach().clone() for n, p in m.projector.named_parameters()}
    losses = train(m, batch, steps=15)
    return {"model": m, "batch": batch, "codes": codes, "losses": losses, "frozen": frozen, "projector": projector}


def collate_instructions_(examples, m):
    from models.chat_format import collate_padded as pad

    batch = pad(examples, pad_id=m.pad_id)
    width = max(e["codes"].shape[-1] for e in examples)
    batch["codes"] = torch.stack([nn.functional.pad(e["codes"], (0, width - e["codes"].shape[-1]), value=-1) for e in examples])
    batch["code_lengths"] = torch.tensor([e["codes"].shape[-1] for e in examples])
    return batch


def test_frame_stacking_covers_every_frame_in_ceil_t_over_k_slots():
    from models.projector import AudioProjector, stack_frames

    states = torch.randn(2, 9, 3)
    stacked, groups = stack_frames(states, torch.tensor([9, 5]), 4)
    assert stacked.shape == (2, 3, 12) and groups.tolist() == [3, 2]
    torch.testing.assert_close(stacked[0, 1], states[0, 4:8].reshape(-1))  # frames 4..7 side by side
    torch.testing.assert_close(stacked[0, 2], torch.cat([states[0, 8], torch.zeros(9)]))  # last group padded
    torch.testing.assert_close(stacked[1, 1], torch.cat([states[1, 4], torch.zeros(9)]))  # past its length: zeros
    proj = AudioProjector(input_dim=3, output_dim=8, stack=4, hidden_dim=16).eval()
    assert [proj.num_positions(t) for t in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    # An utterance gives the same vectors alone and padded in a batch with a longer one (garbage in the pad).
    padded = states.clone()
    padded[1, 5:] = 1e3
    with torch.no_grad():
        alone, n = proj(states[1:2, :5], torch.tensor([5]))
        batched, _ = proj(padded, torch.tensor([9, 5]))
    assert alone.shape == (1, 2, 8) and n.tolist() == [2]
    torch.testing.assert_close(batched[1, :2], alone[0])
    with pytest.raises(ValueError, match="stack"):
        AudioProjector(input_dim=3, output_dim=8, stack=0)


def test_projector_example_and_prompt_place_ceil_t_over_k_slots(gemma3_path):
    m = make_projected(gemma3_path)
    assert m.audio_path == "projector" and m.projector.output_dim == 32 and m.projector.stack == KS
    start, slot, end = (m.tokenizer.convert_tokens_to_ids(t) for t in ("<|audio_start|>", "<|audio|>", "<|audio_end|>"))
    for t in (1, 4, 7, 9):
        ex = m.example(instruction_text="Answer the question.", codes=torch.zeros(Q, t, dtype=torch.long), response="x")
        ids = ex["input_ids"].tolist()
        n = -(-t // KS)
        assert int(ex["audio_positions"].sum()) == ids.count(slot) == n
        first = ids.index(slot)
        assert ids[first - 1] == start and ids[first + n] == end and ex["audio_positions"][first : first + n].all()
        assert (ex["labels"][ex["audio_positions"]] == IGNORE_INDEX).all()
    # The placeholders are special: answers never show them.
    assert m.tokenizer.decode([start, slot, end], skip_special_tokens=True) == ""
    # The slots get the projector's output, frame groups of the decoded codes, in segment order.
    codes = torch.randint(0, K, (2, Q, 7))
    lengths = torch.tensor([7, 5])
    with torch.no_grad():
        got = m.embed_codes(codes, lengths)
        states = m.rvq.decode(codes)
        first, _ = m.projector(states[:1], torch.tensor([7]))
        second, _ = m.projector(states[1:, :5], torch.tensor([5]))
    assert got.shape == (2 + 2, 32)
    torch.testing.assert_close(got, torch.cat([first[0], second[0]]))


class UpsamplingRVQ(DimRVQ):
    """A stand-in for WhisperVQ: one code frame decodes to two states (``decode_upsample`` 2)."""

    decode_upsample = 2

    def decode(self, codes):
        return super().decode(codes).repeat_interleave(2, dim=1)

    def encode(self, x, mask=None):
        return torch.zeros(x.shape[0], Q, x.shape[1], dtype=torch.long)


def test_a_tokenizer_that_decodes_at_twice_its_rate_fills_twice_the_slots(gemma3_path):
    m = make_projected(gemma3_path)
    m.attach_rvq(UpsamplingRVQ())
    slot = m.tokenizer.convert_tokens_to_ids("<|audio|>")
    ex = m.example(instruction_text=None, codes=torch.zeros(Q, 7, dtype=torch.long), response="x")
    assert ex["input_ids"].tolist().count(slot) == -(-14 // KS)  # the 14 decoded states, not the 7 codes
    codes = torch.randint(0, K, (2, Q, 7))
    with torch.no_grad():
        got = m.embed_codes(codes, torch.tensor([7, 5]))
        states = m.rvq.decode(codes)
        first, _ = m.projector(states[:1], torch.tensor([14]))
        second, _ = m.projector(states[1:, :10], torch.tensor([10]))
    torch.testing.assert_close(got, torch.cat([first[0], second[0]]))  # every decoded state is heard
    # Real speech: the round trip decodes at the same rate; without it the rates would differ.
    states, lengths = torch.randn(1, 7, WD), torch.tensor([7])
    assert m.embed_states(states, lengths, rvq_round_trip=True).shape[0] == -(-14 // KS)
    with pytest.raises(ValueError, match="rvq_round_trip"):
        m.embed_states(states, lengths, rvq_round_trip=False)


def test_projector_sizes_are_clear_errors(gemma3_path, tiny_path):
    from models.projector import AudioProjector

    with pytest.raises(ValueError, match="audio_dim"):
        SpokenLLM(model=str(gemma3_path), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=2)
    with pytest.raises(ValueError, match="no audio tower"):
        SpokenLLM(model=str(gemma3_path), dtype="fp32", audio_path="native", lora_r=2)
    with pytest.raises(ValueError, match="tokens mode has no audio path"):
        SpokenLLM(model=str(gemma3_path), dtype="fp32", input_mode="tokens", audio_path="projector", lora_r=2,
                  num_levels=Q, codebook_size=K)  # fmt: skip
    m = make_projected(gemma3_path)
    with pytest.raises(ValueError, match=rf"gives 40-dim states but the projector reads {WD}: set llm.init_args.audio_dim: 40"):
        m.attach_rvq(DimRVQ(40))
    with pytest.raises(ValueError, match=rf"gives 40-dim states but the projector reads {WD}"):
        m.attach_encoder(tiny_whisper_encoder(40))
    with pytest.raises(ValueError, match="gives 16-dim states"):
        m.embed_states(torch.randn(1, 5, 16), torch.tensor([5]))
    with pytest.raises(ValueError, match=rf"reads \[B, T, {WD}\] encoder states"):
        m.projector(torch.randn(1, 5, 16), torch.tensor([5]))
    with pytest.raises(ValueError, match="saved projector .* != this model"):
        m.load_projector(AudioProjector(input_dim=WD, output_dim=32, stack=2))
    with pytest.raises(ValueError, match="not Gemma 4 audio features"):
        m({"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.zeros(1, 3, dtype=torch.long),
           "input_features": torch.zeros(1, 8, 128), "input_features_mask": torch.ones(1, 8)})  # fmt: skip
    # Gemma 4 with a projector (another encoder than its own) keeps its own audio tokens as slots.
    g4 = make_projected(tiny_path, audio_path="projector")
    assert g4._placeholders == ("<|audio>", "<|audio|>", "<audio|>") and g4.audio_token_id == g4.base.config.audio_token_id
    ex = g4.example(instruction_text=None, codes=torch.zeros(Q, 6, dtype=torch.long), response="x")
    with torch.no_grad():
        assert torch.isfinite(g4(collate_instructions_([ex], g4))["loss"])


def test_projector_trains_with_lora_and_the_base_stays_frozen(projected):
    m = projected["model"]
    assert projected["losses"][-1] < 0.5 * projected["losses"][0], projected["losses"]
    after = dict(m.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in projected["frozen"].items())  # base weights untouched
    assert all(not torch.equal(v, after[f"projector.{n}"]) for n, v in projected["projector"].items())
    sd = m.trainable_state_dict()
    assert {k for k in sd if k.startswith("projector.")} == {f"projector.{n}" for n in projected["projector"]}
    assert all(k.startswith("projector.") or "lora_" in k or "trainable_tokens" in k for k in sd)
    prompt = collate_padded([m._mark_audio(build_prompt(m.tokenizer, audio_frames=None, instruction_text=m._with_sound(
        "Answer the question.", m._audio_block(2))), 2)], pad_id=m.pad_id, side="left")  # fmt: skip
    prompt.update(codes=projected["codes"][None], code_lengths=torch.tensor([7]))
    assert m.generate(prompt, max_new_tokens=6) == ["Accra"]


def test_projector_reloads_from_the_adapter_with_the_same_answers(projected, tmp_path):
    from models.projector import AudioProjector

    m, batch = projected["model"], projected["batch"]
    adapter = m.save_adapter(tmp_path / "adapter")
    assert (adapter / "projector.safetensors").is_file() and (adapter / "projector.json").is_file()
    merged = m.export_merged(tmp_path / "merged")
    fresh = make_projected(merged, lora_r=1)  # as speechless-infer builds it: merged LLM + saved projector
    assert len(fresh.tokenizer) == len(m.tokenizer)  # the placeholders came with the merged tokenizer
    with torch.no_grad():
        before = fresh(batch)["loss"]
        fresh.load_projector(AudioProjector.load(adapter))
        want, got = m(batch, return_logits=True), fresh(batch, return_logits=True)
    assert not torch.allclose(before, want["loss"])
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
    # Real speech: a tiny Whisper's states through the RVQ round trip -> the projector, same answers.
    encoder = tiny_whisper_encoder()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8_000, 20_800)]  # 25 and 65 frames
    answers, logits = [], []
    for model in (m, fresh):
        model.attach_encoder(encoder)
        prompts = model.prompts_from_audio(waves, instruction_text="Answer the question.")
        assert prompts["audio_lengths"].tolist() == [25, 65] and prompts["audio_positions"].sum(1).tolist() == [7, 17]
        answers.append([model.generate({**prompts, "rvq_round_trip": rt}, max_new_tokens=4) for rt in (False, True)])
        with torch.no_grad():
            logits.append([model({**prompts, "rvq_round_trip": rt}, return_logits=True)["logits"] for rt in (False, True)])
    assert answers[0] == answers[1] and all(len(a) == 2 for a in answers[0])
    keep = prompts["attention_mask"].bool()
    for ours, theirs in zip(logits[0], logits[1], strict=True):
        torch.testing.assert_close(theirs[keep], ours[keep], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits[0][0][keep], logits[0][1][keep])  # the round trip changes what it hears
