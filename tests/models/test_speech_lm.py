"""Stage-2 model: loss masking, overfit-then-generate, batched == per-sample decoding, save/load."""

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from demo.tiny import gemma3_lm_debug_config, train_tokenizer  # noqa: E402
from models.codec import codes_to_string, sound_token_names  # noqa: E402
from models.speech_lm import IGNORE_INDEX, SpeechLM  # noqa: E402

Q, K = 3, 16
TEXTS = ["hello world", "akwaaba, me din de Kofi na me fi Kumasi"]
CODES = [
    torch.tensor(
        [[1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 4], [5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1] * 3]
    ),
    torch.tensor([[9, 8, 7, 7, 7], [1, 2, 3, 4, 5], [6, 6, 6, 6, 6]]),
]
FORMS = [("one_level", True), ("all_levels", True), ("all_levels", False)]  # (form, delay)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(
        ["hello world, this is a test", "akwaaba me din de kofi", "Kumasi na Accra"] * 5, vocab_size=300
    )


def make_model(tokenizer, form, delay=True, seed=0, **kw):
    torch.manual_seed(seed)
    return SpeechLM(
        lm=gemma3_lm_debug_config(len(tokenizer)),
        tokenizer=tokenizer,
        num_levels=Q,
        codebook_size=K,
        output_form=form,
        max_duration=5,
        delay=delay,
        **kw,
    )


@pytest.fixture(scope="module")
def trained(tokenizer):
    """One tiny model per form, overfit on two (text, codes) pairs."""
    torch.set_num_threads(1)  # tiny dims: threads only add contention on a shared CPU
    models = {}
    for form, delay in FORMS:
        model = make_model(tokenizer, form, delay)
        batch = model.build_batch(TEXTS, CODES)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(80):  # about 25-50 steps needed at this seed; the rest is margin
            model(batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            models[(form, delay)] = (model, model(batch))
    return models


@pytest.mark.parametrize("form,delay", FORMS)
def test_overfit_then_greedy_generate_reproduces_codes(trained, form, delay):
    model, out = trained[(form, delay)]
    assert torch.equal(out["correct"], out["total"]) and out["total"].sum() > 0
    generated = model.generate(TEXTS, max_frames=30)
    for gen, ref in zip(generated, CODES, strict=True):
        expected = ref[:1] if form == "one_level" else ref
        assert gen.dtype == torch.long and torch.equal(gen, expected)


@pytest.mark.parametrize("form,delay", FORMS)
def test_batched_generate_equals_per_sample(tokenizer, form, delay):
    # An untrained model rarely ends early, so every step of the left-padded cache is exercised.
    model = make_model(tokenizer, form, delay, seed=3)
    texts = ["a", TEXTS[1], "Kumasi na Accra na hello world hello world"]  # three prompt lengths
    batched = model.generate(texts, max_frames=10)
    single = [model.generate([t], max_frames=10)[0] for t in texts]
    assert [b.shape for b in batched] == [s.shape for s in single]
    assert all(torch.equal(b, s) for b, s in zip(batched, single, strict=True))


def test_prompt_is_masked_from_the_loss(tokenizer):
    model = make_model(tokenizer, "one_level")
    batch = model.build_batch(TEXTS, CODES)
    # Targets are exactly the compressed codec string after <|sound_start|>, nothing from the prompt.
    for i, codes in enumerate(CODES):
        ids = model.tokenizer(
            codes_to_string(codes[0], compress=True, max_duration=5), add_special_tokens=False
        )["input_ids"]
        labels = batch["labels"][i, 0]
        assert labels[labels != IGNORE_INDEX].tolist() == ids[1:]
    # The loss equals HF's own causal-LM loss with every prompt position labelled -100 (catches any
    # off-by-one between the prompt and answer columns).
    out = model(batch)
    p_len = batch["input_ids"].shape[1]
    full_ids = torch.cat([batch["input_ids"], batch["answer_inputs"][:, 0]], 1)
    full_labels = torch.full_like(full_ids, IGNORE_INDEX)
    full_labels[:, p_len + 1 :] = batch["labels"][:, 0, :-1]
    logits = model.lm(
        input_ids=full_ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    ref = F.cross_entropy(logits[:, p_len:].flatten(0, 1), batch["labels"][:, 0].flatten(), ignore_index=-100)
    torch.testing.assert_close(out["loss"], ref)
    # The opt-in prompt loss adds a term and leaves the speech loss as it was.
    on = model(model.build_batch(TEXTS, CODES, loss_on_prompt=True))
    assert on["prompt_loss"] > 0 and torch.allclose(on["loss"], on["speech_loss"] + on["prompt_loss"])
    torch.testing.assert_close(on["speech_loss"], out["loss"])


def test_all_levels_loss_ignores_prompt_targets(tokenizer):
    model = make_model(tokenizer, "all_levels")
    batch = model.build_batch(TEXTS, CODES)
    labels = batch["labels"]
    # Delay pattern: level q of frame t sits at step t + q; every head ends with EOS = K.
    assert labels.shape == (2, Q, 12 + Q)
    for q in range(Q):
        assert labels[0, q, q : q + 12].tolist() == CODES[0][q].tolist() and labels[0, q, q + 12] == K
    out = model(batch)
    assert out["total"].tolist() == [12 + 1 + 5 + 1] * Q
    # No gradient reaches logits at ignored (padding / delay-filler) positions.
    grads = torch.autograd.grad(out["loss"], out["logits"])[0]
    ignored = (labels == IGNORE_INDEX).unsqueeze(-1).expand_as(grads)
    assert grads[ignored].abs().max() == 0 and grads[~ignored].abs().max() > 0


@pytest.mark.parametrize("form", ["one_level", "all_levels"])
def test_generation_stops_at_max_frames_without_end_of_speech(tokenizer, form):
    model = make_model(tokenizer, form, seed=1)
    if form == "one_level":
        inner, end_col = model._lm_logits, torch.tensor([len(model.answer_vocab) - 1])

        def no_end(h, weight=None):  # decoding restricts logits to the answer vocabulary, end last
            logits = inner(h, weight)
            return logits if weight is None else logits.index_fill(-1, end_col, -1e9)

        model._lm_logits = no_end
    else:
        hook = model.heads[0].register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([K]), -1e9))
    out = model.generate(TEXTS, max_frames=7)
    assert [o.shape[-1] for o in out] == [7, 7]
    assert all(int(o.max()) < K for o in out)
    if form == "all_levels":
        hook.remove()


def test_sampling_is_seeded(tokenizer):
    model = make_model(tokenizer, "all_levels", seed=2)
    a = model.generate(TEXTS, max_frames=8, greedy=False, top_k=5, seed=7)
    b = model.generate(TEXTS, max_frames=8, greedy=False, top_k=5, seed=7)
    c = model.generate(TEXTS, max_frames=8, greedy=False, top_k=5, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("form,delay", FORMS[:2])
def test_save_load_round_trip(trained, tmp_path, form, delay):
    model = trained[(form, delay)][0]
    model.save(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    loaded = SpeechLM.load(tmp_path)
    assert loaded.output_form == form and loaded.num_levels == Q
    for a, b in zip(model.generate(TEXTS, max_frames=30), loaded.generate(TEXTS, max_frames=30), strict=True):
        assert torch.equal(a, b)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)


def test_bad_codes_raise(tokenizer):
    model = make_model(tokenizer, "all_levels")
    with pytest.raises(ValueError, match="out of range"):
        model.build_batch(["x"], [torch.full((Q, 3), K)])
    with pytest.raises(ValueError, match=r"\[Q>=3, T\]"):
        model.build_batch(["x"], [torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="texts but"):
        model.build_batch(["x", "y"], [torch.zeros(Q, 3, dtype=torch.long)])


def test_tokenizer_round_trip_and_chat_template(tokenizer, tmp_path):
    tok = train_tokenizer(["abc def"] * 3, vocab_size=280, special_tokens=sound_token_names(4))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "ɛyɛ"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<bos><start_of_turn>user\nɛyɛ<end_of_turn>\n<start_of_turn>model\n"
    s = codes_to_string([1, 1, 3], compress=True)
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # start, duration, sound, sound, end: each one token, never split
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        back(prompt, add_special_tokens=False)["input_ids"]
        == tok(prompt, add_special_tokens=False)["input_ids"]
    )
    assert back.decode(back("héllo ɛ wörld")["input_ids"], skip_special_tokens=True) == "héllo ɛ wörld"
    assert back.unk_token_id not in back("日本語 🎵")["input_ids"]  # byte-level: any text encodes
    assert (
        back.padding_side == "left"
        and back.pad_token == "<pad>"
        and back("x")["input_ids"][0] == back.bos_token_id
    )


@pytest.mark.parametrize("form", ["one_level", "all_levels"])
def test_min_frames_fixes_the_length(trained, form):
    model = trained[(form, True)][0]  # trained to stop after 12 and 5 frames
    assert [c.shape[-1] for c in model.generate(TEXTS, max_frames=30)] == [12, 5]
    assert [c.shape[-1] for c in model.generate(TEXTS, max_frames=9, min_frames=9)] == [9, 9]
    with pytest.raises(ValueError):
        model.generate(TEXTS, max_frames=3, min_frames=4)


def _fixed_head0(model, probs_first: float, probs_end: float):
    """Head 0 (all_levels) or the answer logits (one_level) always give code 0 ``probs_first`` and the
    end ``probs_end``; the rest is spread evenly over the other codes. Returns an undo callable."""

    def logits_for(n_out: int, end_col: int, like: torch.Tensor) -> torch.Tensor:
        p = torch.full((n_out,), (1 - probs_first - probs_end) / (n_out - 2))
        p[0], p[end_col] = probs_first, probs_end
        return p.log().to(like).expand(*like.shape[:-1], n_out).clone()

    if model.output_form == "all_levels":
        hook = model.heads[0].register_forward_hook(lambda m, i, o: logits_for(K + 1, K, o))
        return hook.remove
    inner = model._lm_logits
    n_dur = len(model.answer_vocab) - K - 1

    def fixed(h, weight=None):
        out = inner(h, weight)
        if weight is None:
            return out
        fixed_out = logits_for(out.shape[-1], out.shape[-1] - 1, out)
        fixed_out[..., K : K + n_dur] = -1e9  # no duration tokens: one frame per step
        return fixed_out

    model._lm_logits = fixed
    return lambda: setattr(model, "_lm_logits", inner)


@pytest.mark.parametrize("form", ["one_level", "all_levels"])
def test_median_end_rule_stops_where_survival_falls_below_half(tokenizer, form):
    # P(end) = 0.3 at every step, below P(code 0) = 0.5: greedy argmax never ends, while the
    # probability of still speaking is 0.7 after one step and 0.49 after two, so "median" ends
    # after one frame.
    model = make_model(tokenizer, form, seed=4)
    undo = _fixed_head0(model, 0.5, 0.3)
    try:
        argmax = model.generate(TEXTS, max_frames=9, eos_rule="argmax")
        median = model.generate(TEXTS, max_frames=9, eos_rule="median")
        late = model.generate(TEXTS, max_frames=9, min_frames=4, eos_rule="median")
    finally:
        undo()
    assert [g.shape[-1] for g in argmax] == [9, 9]
    assert [g.shape[-1] for g in median] == [1, 1]
    assert all(int(g[0, 0]) == 0 for g in median)
    # Steps before min_frames do not count towards the hazard; the next two do.
    assert [g.shape[-1] for g in late] == [5, 5]
    with pytest.raises(ValueError):
        model.generate(TEXTS, max_frames=3, eos_rule="mode")


@pytest.mark.parametrize("form,delay", FORMS)
def test_guided_generation_is_batch_invariant_and_scale_one_is_plain(tokenizer, form, delay):
    model = make_model(tokenizer, form, delay, seed=5)
    texts = ["a", TEXTS[1], "Kumasi na Accra"]
    plain = model.generate(texts, max_frames=8)
    assert all(torch.equal(a, b) for a, b in zip(plain, model.generate(texts, max_frames=8, cfg_scale=1.0), strict=True))
    guided = model.generate(texts, max_frames=8, cfg_scale=3.0)
    single = [model.generate([t], max_frames=8, cfg_scale=3.0)[0] for t in texts]
    assert all(torch.equal(a, b) for a, b in zip(guided, single, strict=True))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(guided, plain, strict=True))
    with pytest.raises(ValueError):
        model.generate(texts, max_frames=8, cfg_scale=0.0)


def test_guidance_combines_prompted_and_empty_prompt_logits(tokenizer):
    # The first guided step must pick argmax(u + s (c - u)) of the two real forward passes.
    model = make_model(tokenizer, "all_levels", delay=False, seed=6)
    text, scale = TEXTS[1], 2.5
    with torch.no_grad():
        c = model(model.build_batch([text], [torch.zeros(Q, 1, dtype=torch.long)]))["logits"][0, :, 0]
        u = model(model.build_batch([""], [torch.zeros(Q, 1, dtype=torch.long)]))["logits"][0, :, 0]
    guided = u + scale * (c - u)
    guided[1:, K] = float("-inf")  # only head 0 may end
    expected = guided.argmax(-1)
    first = model.generate([text], max_frames=1, min_frames=1, cfg_scale=scale)[0][:, 0]
    assert torch.equal(first, expected)
    # At this seed guidance changes the pick, so the check tells guided from plain decoding.
    assert not torch.equal(first, model.generate([text], max_frames=1, min_frames=1)[0][:, 0])


def test_length_conditioning_learns_the_length_and_ends_there(tokenizer):
    with pytest.raises(ValueError, match="all_levels"):
        make_model(tokenizer, "one_level", length_conditioning=True)
    model = make_model(tokenizer, "all_levels", length_conditioning=True)
    batch = model.build_batch(TEXTS, CODES)
    assert batch["answer_frames"].tolist() == [12, 5]
    out = model(batch)
    assert float(out["loss"].detach()) == pytest.approx(float((out["speech_loss"] + out["length_loss"]).detach()), rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert model.predict_lengths(TEXTS).tolist() == [12, 5]
    # Greedy decoding ends each utterance at its predicted length and reproduces the codes.
    for gen, ref in zip(model.generate(TEXTS, max_frames=30), CODES, strict=True):
        assert torch.equal(gen, ref)
    # A given length is obeyed exactly (clamped to the guard), batched or alone.
    forced = model.generate(TEXTS, max_frames=9, lengths=[7, 20])
    assert [g.shape[1] for g in forced] == [7, 9]
    alone = model.generate(TEXTS[1:], max_frames=9, lengths=[20])
    assert torch.equal(alone[0], forced[1])


def test_length_conditioned_decoding_matches_the_teacher_forced_pass(tokenizer):
    """The cached decode feeds each step the same progress embedding as the training pass does."""
    model = make_model(tokenizer, "all_levels", seed=5, length_conditioning=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.progress.weight, std=0.5)  # make progress matter
    gen = model.generate(TEXTS, max_frames=6, lengths=[6, 4])
    with torch.no_grad():
        out = model(model.build_batch(TEXTS, gen))
    for i, g in enumerate(gen):  # each generated code is the argmax of the teacher-forced pass
        n = g.shape[1]
        for q in range(Q):
            assert torch.equal(out["logits"][i, q, q : q + n, :K].argmax(-1), g[q])


def test_length_conditioning_survives_save_and_load(tokenizer, tmp_path):
    model = make_model(tokenizer, "all_levels", length_conditioning=True)
    with torch.no_grad():
        model.length_head.bias.fill_(2.0)
    model.save(tmp_path / "lm")
    loaded = SpeechLM.load(tmp_path / "lm")
    assert loaded.length_conditioning and torch.equal(loaded.predict_lengths(TEXTS), model.predict_lengths(TEXTS))


def test_level_weights_weight_the_levels_cross_entropies(tokenizer):
    with pytest.raises(ValueError, match="level_weights"):
        make_model(tokenizer, "all_levels", level_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="level_weights"):
        make_model(tokenizer, "all_levels", level_weights=[0.0, 0.0, 0.0])
    plain = make_model(tokenizer, "all_levels")
    batch = plain.build_batch(TEXTS, CODES)
    out = plain(batch)
    weighted = make_model(tokenizer, "all_levels", level_weights=[2.0, 1.0, 1.0])
    got = weighted(batch)
    assert torch.allclose(got["level_loss"], out["level_loss"])  # same seed: same network
    expect = (2 * out["level_loss"][0] + out["level_loss"][1] + out["level_loss"][2]) / 4
    assert float(got["speech_loss"].detach()) == pytest.approx(float(expect.detach()), rel=1e-5)
    only0 = make_model(tokenizer, "all_levels", level_weights=[1.0, 0.0, 0.0])
    only0(batch)["loss"].backward()  # a zero-weight level's head gets no gradient
    assert only0.heads[1].weight.grad.abs().sum() == 0 and only0.heads[0].weight.grad.abs().sum() > 0


def test_input_corruption_changes_training_inputs_only(tokenizer):
    with pytest.raises(ValueError, match="input_corruption"):
        make_model(tokenizer, "one_level", input_corruption=0.2)
    model = make_model(tokenizer, "all_levels", input_corruption=0.5)
    batch = model.build_batch(TEXTS, CODES)
    answer = batch["answer_inputs"]
    torch.manual_seed(1)
    corrupted = model.form.corrupt(model, answer)
    codes = answer < K
    assert torch.equal(corrupted[~codes], answer[~codes])  # EOS, PAD and begin of speech kept
    changed = float((corrupted != answer)[codes].float().mean())
    assert 0.2 < changed < 0.6  # about half, less the random codes that equal the real one (1/16)
    model.eval()  # evaluation (and generation) sees the real inputs: identical logits twice
    a, b = model(batch)["logits"], model(batch)["logits"]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(2)
    assert not torch.allclose(model(batch)["logits"], a)


def test_scheduled_sampling_feeds_the_models_own_predictions(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="scheduled_sampling"):
        make_model(tokenizer, "one_level", scheduled_sampling=0.5)
    model = make_model(tokenizer, "all_levels", scheduled_sampling=1.0)
    batch = model.build_batch(TEXTS, CODES)
    answer = batch["answer_inputs"]
    model.train()
    fed = model.form.self_fed(model, batch, answer)
    model.eval()
    pred = model(batch)["logits"].argmax(-1)  # teacher-forced predictions: step s predicts step s + 1
    codes = answer < K
    assert torch.equal(fed[~codes], answer[~codes])  # begin of speech, EOS and padding kept
    expect = torch.where(pred[..., :-1] < K, pred[..., :-1], answer[..., 1:])
    assert torch.equal(fed[..., 1:][codes[..., 1:]], expect[codes[..., 1:]])  # every real code is the model's own
    assert (fed != answer).any() and fed.max() < K + 2 and not (fed[codes] == K).any()  # never an EOS inside
    a = model(batch)["logits"]  # evaluation sees the real inputs
    model.train()
    assert model.training and not torch.allclose(model(batch)["logits"], a)
    half = make_model(tokenizer, "all_levels", scheduled_sampling=0.5).train()
    torch.manual_seed(3)
    steps = (half.form.self_fed(half, batch, answer) != answer).any(1)  # [B, S] steps changed
    assert 0.1 < float(steps[codes.any(1)].float().mean()) < 0.9  # about half the steps, all levels at once
    half.save(tmp_path / "lm")
    assert SpeechLM.load(tmp_path / "lm").scheduled_sampling == 0.5


def test_level_weights_corruption_and_alignment_survive_save_and_load(tokenizer, tmp_path):
    model = make_model(tokenizer, "all_levels", level_weights=[4.0, 2.0, 1.0], input_corruption=0.25,
                       length_conditioning=True, text_alignment=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.alignment.weight, std=0.5)
    model.save(tmp_path / "lm")
    loaded = SpeechLM.load(tmp_path / "lm")
    assert loaded.level_weights == [4.0, 2.0, 1.0] and loaded.input_corruption == 0.25 and loaded.text_alignment
    assert torch.equal(loaded.alignment.weight, model.alignment.weight)


def test_text_alignment_spreads_the_text_tokens_over_the_frames(tokenizer):
    with pytest.raises(ValueError, match="length_conditioning"):
        make_model(tokenizer, "all_levels", text_alignment=True)
    model = make_model(tokenizer, "all_levels", length_conditioning=True, text_alignment=True)
    batch = model.build_batch(TEXTS + [""], CODES + [CODES[1]])
    for row, (a, b) in zip(batch["input_ids"], batch["text_span"].tolist(), strict=True):
        assert tokenizer.decode(row[a:b]).strip() == tokenizer.decode(row[a:b], skip_special_tokens=True).strip()
    spans = batch["text_span"].tolist()
    assert [tokenizer.decode(batch["input_ids"][i, a:b]).replace(" ", "") for i, (a, b) in enumerate(spans)] == [
        t.replace(" ", "") for t in TEXTS + [""]]
    # Frame s of T gets text token floor(s * n / T): the first frames the first token, the last the last.
    with torch.no_grad():
        torch.nn.init.normal_(model.alignment.weight, std=0.5)
        model.progress.weight.zero_()
    steps = torch.arange(12).expand(3, -1)
    cond = model.form.condition(model, steps, torch.tensor([12, 12, 12]), batch)
    assert cond[2].abs().max() == 0  # the empty prompt: nothing to align
    table, ids = model.lm.get_input_embeddings(), batch["input_ids"]
    a, b = spans[0]
    for s, j in ((0, a), (11, b - 1)):
        nb = [ids[0, max(j - 1, a)], ids[0, j], ids[0, min(j + 1, b - 1)]]
        expect = model.alignment(torch.cat([table(torch.stack(nb)[i : i + 1])[0] for i in range(3)]))
        assert torch.allclose(cond[0, s], expect, atol=1e-6)


def test_text_aligned_decoding_matches_the_teacher_forced_pass_and_learns(tokenizer):
    model = make_model(tokenizer, "all_levels", seed=5, length_conditioning=True, text_alignment=True)
    with torch.no_grad():
        torch.nn.init.normal_(model.alignment.weight, std=0.5)
    gen = model.generate(TEXTS, max_frames=6, lengths=[6, 4], cfg_scale=2.0)
    guided = model.generate(TEXTS[1:], max_frames=6, lengths=[4], cfg_scale=2.0)
    assert torch.equal(guided[0], gen[1])  # guidance's empty half does not leak between rows
    gen = model.generate(TEXTS, max_frames=6, lengths=[6, 4])
    with torch.no_grad():
        out = model(model.build_batch(TEXTS, gen))
    for i, g in enumerate(gen):
        for q in range(Q):
            assert torch.equal(out["logits"][i, q, q : q + g.shape[1], :K].argmax(-1), g[q])
    model = make_model(tokenizer, "all_levels", length_conditioning=True, text_alignment=True)
    batch = model.build_batch(TEXTS, CODES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert model.alignment.weight.abs().sum() > 0
    for g, ref in zip(model.generate(TEXTS, max_frames=30), CODES, strict=True):
        assert torch.equal(g, ref)
