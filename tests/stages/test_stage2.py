"""Stage 2 (text -> semantic tokens): training masks, artifact checks, synthesis, promotion round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from datamodules.shards import ShardWriter
from datamodules.speech import SpeechDataModule
from datamodules.text import TextInstructionDataModule
from demo.tiny import save_gemma3_lm_debug
from models.rvq import ResidualVQ
from models.speech_lm import SpeechLM
from stages.artifacts import load_artifact, promote
from stages.metrics import aligned_cosine, dtw_cosine, word_match
from stages.stage2 import SpeechlessStage, own_text
from stages.writers import ShardPredictionWriter

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(2)

WORDS = ["zero", "one", "two"]
Q, K = 2, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=Q, codebook_size=K)
    promote(
        stage="stage1",
        modules={"quantizer": _spec(rvq)},
        metrics={"val/cosine": 1.0},
        artifacts_dir=root / "artifacts",
        info={"num_quantizers": Q, "codebook_size": K, "dim": 16},
    )
    rng = np.random.default_rng(0)
    writer = ShardWriter(root / "tokens", prefix="tokens", max_samples=100, kind="tokens")
    for n in range(12):
        w = n % len(WORDS)
        codes = np.stack([np.full(3 + w, w + q, dtype=np.int16) for q in range(Q)])  # learnable per word
        writer.write({"__key__": f"u{n:03d}", "json": {"text": WORDS[w]}, "codes.npy": codes},
                     seconds=0.04 * codes.shape[1])
    writer.close()
    with open(root / "instructions.jsonl", "w") as f:
        for n in range(5):
            f.write(json.dumps({"id": f"i{n}", "instruction": WORDS[n % 3], "response": "ok"}) + "\n")
    lm_dir = save_gemma3_lm_debug(root / "lm", WORDS * 5 + ["ok"], vocab_size=300, hidden_size=32)
    del rng
    return root, lm_dir


def _spec(rvq: ResidualVQ):
    from stages.artifacts import ArtifactModule

    return ArtifactModule(
        "models.rvq.ResidualVQ", {"dim": 16, "num_quantizers": Q, "codebook_size": K}, rvq.state_dict()
    )


def _stage(world, **kw) -> SpeechlessStage:
    root, lm_dir = world
    torch.manual_seed(0)
    lm = SpeechLM(lm=str(lm_dir), tokenizer=str(lm_dir), num_levels=kw.pop("num_levels", Q), codebook_size=K,
                  loss_on_prompt=kw.pop("loss_on_prompt", False))
    return SpeechlessStage(lm=lm, stage1_artifact=str(root / "artifacts/stage1/current"), gen_max_frames=8, **kw)


def _data(world) -> SpeechDataModule:
    root, _ = world
    return SpeechDataModule(train_shards=str(root / "tokens"), val_shards=str(root / "tokens"),
                            test_shards=str(root / "tokens"), fields="tokens", max_batch_size=6,
                            max_batch_seconds=100.0)


def _batch(world) -> dict:
    dm = _data(world)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_mismatched_artifact_is_a_clear_error(world):
    with pytest.raises(ValueError, match="levels"):
        _stage(world, num_levels=3)


def test_loss_is_on_speech_only_and_padding_is_dropped(world):
    stage = _stage(world, loss_on_prompt=True)  # the LM's own default must not leak into stage 2
    batch = _batch(world)
    loss = stage.training_step(batch, 0)
    texts, codes = stage._real(batch)
    with_prompt = stage.lm(stage.lm.build_batch(texts, codes, loss_on_prompt=True))
    torch.testing.assert_close(loss, with_prompt["speech_loss"])
    assert with_prompt["loss"] > loss + 1e-3  # the prompt term would have been counted
    padded = dict(batch, sample_weight=torch.zeros_like(batch["sample_weight"]))
    zero = stage.training_step(padded, 0)
    assert float(zero) == 0.0 and zero.requires_grad


def test_word_match_counts_own_word_closest():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    right = [("a", a, a), ("b", b, b)]
    swapped = [("a", b, a), ("b", a, b)]
    assert word_match(right) == (1.0, 2)
    assert word_match(swapped) == (0.0, 2)


def test_dtw_cosine_aligns_time_warps_that_a_linear_stretch_blurs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 8, generator=g)
    warped = torch.cat([a[:1], a[1:2].repeat(4, 1), a[2:]])  # the second frame held four times longer
    other = torch.randn(7, 8, generator=g)
    dtw = dtw_cosine([a, a, a, a[:0]], [warped, a, other, a])
    torch.testing.assert_close(dtw[:2], torch.ones(2))  # a warp of the same frames is a perfect match
    assert aligned_cosine(a, warped) < 0.95  # the linear stretch misaligns the later frames
    assert dtw[2] < 0.6 and dtw[3] == 0  # unrelated frames score low; an empty side scores 0
    # The best path: the mean cosine along it is at least that of the diagonal for equal lengths.
    b = torch.randn(6, 8, generator=g)
    assert dtw_cosine([a], [b])[0] >= F.cosine_similarity(a, b, dim=-1).mean() - 1e-6


def _dtw_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Textbook O(T U) dynamic programme: mean cosine along the cheapest path."""
    cost = 1 - F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    acc = [[(float("inf"), 0)] * (b.shape[0] + 1) for _ in range(a.shape[0] + 1)]
    acc[0][0] = (0.0, 0)
    for i in range(1, a.shape[0] + 1):
        for j in range(1, b.shape[0] + 1):
            best = min(acc[i - 1][j - 1], acc[i - 1][j], acc[i][j - 1], key=lambda x: x[0])
            acc[i][j] = (best[0] + float(cost[i - 1, j - 1]), best[1] + 1)
    total, steps = acc[-1][-1]
    return 1 - total / steps


def test_dtw_cosine_equals_the_textbook_recursion_in_any_chunking():
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 10, (30, 2), generator=g).tolist()
    gens = [torch.randn(t, 4, generator=g) for t, _ in lengths]
    reals = [torch.randn(u, 4, generator=g) for _, u in lengths]
    expected = torch.tensor([_dtw_reference(a, b) for a, b in zip(gens, reals, strict=True)])
    for max_cells in (1, 50, 1 << 25):  # one pair per chunk, a few, all at once
        torch.testing.assert_close(dtw_cosine(gens, reals, max_cells=max_cells), expected)


def test_word_match_with_warped_renditions():
    # Each word's "generation" is its real utterance with one sound held longer: DTW still matches
    # every word; around the mean state the words are unrelated, so matching is not by chance.
    g = torch.Generator().manual_seed(1)
    reals = {w: torch.randn(5, 8, generator=g) for w in "abcd"}
    items = [(w, torch.cat([r[:2], r[2:3].repeat(5, 1), r[3:]]), r) for w, r in reals.items()]
    assert word_match(items) == (1.0, 4)
    assert word_match(items, align="linear")[1] == 4


def test_text_dropout_trains_some_steps_on_the_empty_prompt(world, monkeypatch):
    with pytest.raises(ValueError, match="text_dropout"):
        _stage(world, cfg_scale=2.0)  # guidance without an unprompted model to guide against
    stage = _stage(world, text_dropout=0.5, cfg_scale=2.0)
    seen = []
    build = stage.lm.build_batch
    monkeypatch.setattr(stage.lm, "build_batch", lambda texts, *a, **k: seen.append(list(texts)) or build(texts, *a, **k))
    torch.manual_seed(0)
    batch = _batch(world)
    for _ in range(4):
        stage.training_step(batch, 0)
    texts = [t for step in seen for t in step]
    assert 0 < texts.count("") < len(texts)
    assert set(texts) - {""} <= set(WORDS)


def test_gen_batches_limits_generation_not_teacher_forced_metrics(world, monkeypatch):
    with pytest.raises(ValueError, match="gen_batches"):
        _stage(world, gen_batches=0)
    stage = _stage(world, gen_batches=1)
    calls = []
    generate = stage._generate
    monkeypatch.setattr(stage, "_generate", lambda texts: calls.append(len(texts)) or generate(texts))
    batch = _batch(world)
    n = int((batch["sample_weight"] > 0).sum())
    for idx in range(3):
        stage.validation_step(batch, idx)
    assert calls == []  # queued until gen_batch_size texts wait, or the epoch ends
    stage._flush("val")
    assert calls == [n]  # only the first batch generated
    assert stage.val_len_error.update_count == n  # one length per generated utterance
    assert int(stage.val_loss.update_count) == 3  # the loss saw every batch


def test_generation_is_queued_across_batches_with_the_same_figures(world, monkeypatch):
    """Long sentences make one-utterance evaluation batches; generating them together changes no figure."""
    with pytest.raises(ValueError, match="gen_batch_size"):
        _stage(world, gen_batch_size=0)
    batch = _batch(world)
    live = [i for i, w in enumerate(batch["sample_weight"]) if w > 0]
    singles = [{**batch, "codes": batch["codes"][i : i + 1], "code_lengths": batch["code_lengths"][i : i + 1],
                "meta": [batch["meta"][i]], "sample_weight": batch["sample_weight"][i : i + 1]} for i in live]
    figures = []
    for size in (1, 4):
        stage = _stage(world, gen_batch_size=size)
        calls = []
        generate = stage._generate
        monkeypatch.setattr(stage, "_generate", lambda texts, g=generate, c=calls: c.append(len(texts)) or g(texts))
        for idx, single in enumerate(singles):
            stage.validation_step(single, idx)
        stage._flush("val")
        figures.append((float(stage.val_gen_cosine.compute()), float(stage.val_len_error.compute())))
        assert calls == ([1] * len(singles) if size == 1 else [4] * (len(singles) // 4) + [len(singles) % 4] * (len(singles) % 4 > 0))
    assert figures[0] == pytest.approx(figures[1])


def test_cosine_schedule_warms_up_then_decays_to_the_floor_at_the_last_step(world):
    from lightning.pytorch.callbacks import Callback

    from stages.optim import fit_steps

    with pytest.raises(ValueError, match="lr_schedule"):
        _stage(world, lr_schedule="linear")
    rates = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, *args):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    for limit in ({"max_steps": 7}, {"max_epochs": 3}):  # steps given, or counted from the datamodule
        rates.clear()
        stage = _stage(world, lr=1e-2, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
        Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Record()],
                **limit).fit(stage, datamodule=_data(world))
        assert rates[0] == pytest.approx(5e-3) and rates[1] == pytest.approx(1e-2)  # warm-up, then the peak
        assert all(a >= b for a, b in zip(rates[1:], rates[2:]))  # then only down
        assert len(rates) == fit_steps(stage.trainer)
        assert rates[-1] == pytest.approx(1e-3, rel=1e-6)  # the floor, min_lr_ratio * lr, at the last step


def test_instruction_ranks_cover_each_once(world):
    root, _ = world
    seen, batches = [], []
    for rank in range(2):
        dm = TextInstructionDataModule(path=str(root / "instructions.jsonl"), batch_size=2, rank=rank, world_size=2)
        dm.setup("predict")
        loader = list(dm.predict_dataloader())
        batches.append(len(loader))
        for b in loader:
            seen += [k for k, w in zip(b["keys"], b["sample_weight"], strict=True) if w > 0]
    assert sorted(seen) == [f"i{n}" for n in range(5)]
    assert batches[0] == batches[1]


def test_fit_promote_reload_and_synthesize(world, tmp_path):
    root, _ = world
    stage = _stage(world, lr=3e-3)
    trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=_data(world))
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/acc", "val/acc_l0", "val/gen_cosine", "val/len_error", "val/word_match"):
        assert key in metrics, key
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")  # tensors and plain containers only (issue #11)
    state = torch.load(tmp_path / "stage2.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("lm.") for k in state)
    result = promote(stage="stage2", modules=stage.artifact_modules({}), metrics={"val/loss": 1.0},
                     artifacts_dir=tmp_path / "artifacts", info=stage.artifact_info())
    assert (result.path / "lm" / "model.safetensors").exists()
    loaded = load_artifact(tmp_path / "artifacts/stage2/current")["modules"]["lm"]
    texts = ["zero", "two", "one"]
    expected = stage.lm.generate(texts, max_frames=8)
    got = loaded.generate(texts, max_frames=8)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)

    # Synthesis over 2 ranks (rank passed explicitly): every instruction written exactly once.
    synth = SpeechlessStage(artifact=str(tmp_path / "artifacts/stage2/current"),
                            stage1_artifact=str(root / "artifacts/stage1/current"), gen_max_frames=8)
    out = tmp_path / "synthetic"
    for rank in range(2):
        dm = TextInstructionDataModule(path=str(root / "instructions.jsonl"), batch_size=2, rank=rank, world_size=2)
        writer = ShardPredictionWriter(output_dir=str(out / f"r{rank}"), kind="tokens", prefix="synthetic",
                                       jsonl_name="synthetic.jsonl")
        Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False).predict(
            synth, datamodule=dm, return_predictions=False
        )
    records = [json.loads(line) for r in range(2) for line in open(out / f"r{r}" / "synthetic.jsonl")]
    assert sorted(r["id"] for r in records) == [f"i{n}" for n in range(5)]
    assert all(len(r["codes"]) == Q and r["text"] in WORDS for r in records)


def _piece(parent: str, segment: int, text: str = "", **extra) -> dict:
    """A piece's json as speechless-prepare writes it for a recording cut at silence."""
    return {"text": text, "parent_text": "zero one two", "text_scope": "parent", "parent": parent,
            "segment": segment, "offset": 1.0 * segment, "duration": 0.2, **extra}


def test_pieces_without_their_own_text_are_counted_skips_not_empty_prompts(world, tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path / "tokens", prefix="tokens", max_samples=100, kind="tokens")
    metas = {f"u{n}": {"text": WORDS[n % 3], "duration": 0.2} for n in range(4)}
    metas |= {f"long-{i:03d}": _piece("long", i) for i in range(3)}
    metas["aligned-000"] = _piece("aligned", 0, text="two", text_scope="segment")  # an aligner's own text
    metas["untranscribed"] = {"text": "", "duration": 0.2}  # kept by prepare --no-require-text
    for key, meta in metas.items():
        w = WORDS.index(meta["text"]) if meta["text"] else 0
        codes = np.stack([np.full(5, w + q, dtype=np.int16) for q in range(Q)])
        writer.write({"__key__": key, "json": meta, "codes.npy": codes}, seconds=0.2)
    writer.close()
    folder = str(tmp_path / "tokens")
    dm = SpeechDataModule(train_shards=folder, val_shards=folder, fields="tokens", max_batch_size=4,
                          max_batch_seconds=100.0)
    dm.setup("fit")
    # Unbound, as stage 1 (audio only) reads its shards: every piece is a sample.
    assert sorted(k for b in dm.train_dataloader() for k in b["keys"]) == sorted(metas)

    stage = _stage(world)
    seen: list[tuple[bool, dict]] = []
    real = stage._real
    monkeypatch.setattr(stage, "_real", lambda batch: seen.append((stage.training, batch)) or real(batch))
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=dm)
    assert dm.transform is own_text
    expected = {"piece_without_text": 3, "no_text": 1}
    kept = sorted(["aligned-000", *(f"u{n}" for n in range(4))])
    for training in (True, False):  # one training epoch, then one validation pass
        batches = [b for t, b in seen if t == training]
        split = "train" if training else "val"
        keys = [k for b in batches for k, w in zip(b["keys"], b["sample_weight"], strict=True) if w > 0]
        assert sorted(keys) == kept, split
        skipped: dict[str, int] = {}
        for b in batches:
            for reason, n in b["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        assert skipped == expected, split
        assert all(m["text"] for b in batches for m in b["meta"])  # no empty prompt reached the LM


# ---- intelligibility: the frozen Whisper decoder transcribes generated and real codes -------------
ASR_TEXTS = ["Zero!", "One hello!", "Two hello hello hello!"]  # 1, 2 and 4 words: each its own WER


@pytest.fixture(scope="module")
def asr_world(tmp_path_factory):
    """A stage-1 artifact over a tiny random Whisper encoder (pooling 2) and token shards for it."""
    from demo.tiny import save_whisper_debug
    from models.encoders import WhisperEncoder
    from stages.artifacts import ArtifactModule

    root = tmp_path_factory.mktemp("stage2_asr")
    whisper = _say_one_word(save_whisper_debug(root / "whisper", [" ".join(WORDS + ["hello"])] * 3), " hello")
    encoder = WhisperEncoder(source=str(whisper), pooling=2)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=encoder.dim, num_quantizers=Q, codebook_size=K, kmeans_init=False)
    spec = {"dim": encoder.dim, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    info = {"num_quantizers": Q, "codebook_size": K, "dim": encoder.dim, "encoder": encoder.describe()}
    promote(stage="stage1", modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", spec, rvq.state_dict())},
            metrics={"val/cosine": 1.0}, artifacts_dir=root / "artifacts", info=info)
    writer = ShardWriter(root / "tokens", prefix="tokens", max_samples=100, kind="tokens")
    for n in range(6):
        w = n % len(WORDS)
        codes = np.stack([np.full(3 + w, w + q, dtype=np.int16) for q in range(Q)])
        writer.write({"__key__": f"u{n:03d}", "json": {"text": ASR_TEXTS[w], "language": "en"},
                      "codes.npy": codes}, seconds=0.04 * codes.shape[1])
    writer.close()
    return root, save_gemma3_lm_debug(root / "lm", WORDS * 5, vocab_size=300, hidden_size=32), info


def _say_one_word(folder, word: str):
    """Make a tiny random Whisper always say ``word``: its decoder's output is then one constant state.

    A random decoder says nothing a normaliser keeps, so every WER would be 1 and a wrong sum over
    ranks could not show; with one word said, the WER depends on which references are scored.
    """
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder)
    (token,) = AutoTokenizer.from_pretrained(folder)(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()))
        model.model.decoder.embed_tokens.weight[token] = 10 * norm.bias  # tied output row: the top logit
    model.save_pretrained(folder)
    return folder


def _asr_stage(asr_world, **kw) -> SpeechlessStage:
    root, lm_dir, _ = asr_world
    torch.manual_seed(0)
    lm = SpeechLM(lm=str(lm_dir), tokenizer=str(lm_dir), num_levels=Q, codebook_size=K)
    return SpeechlessStage(lm=lm, stage1_artifact=str(root / "artifacts/stage1/current"), gen_max_frames=8,
                           asr_max_new_tokens=6, **kw)


def test_validate_logs_the_wer_of_generated_and_of_real_codes(asr_world):
    from torchmetrics.text import CharErrorRate, WordErrorRate

    from stages.metrics import normalize_transcript

    root, _, _ = asr_world
    stage = _asr_stage(asr_world)  # asr_decoder "auto": the stage-1 encoder's Whisper folder
    assert stage.asr is not None and stage.asr.pooling == 2 and stage.asr.source == str(root / "whisper")
    assert not any(k.startswith("asr") for k in stage.state_dict())  # frozen weights stay out of checkpoints
    folder = str(root / "tokens")
    dm = SpeechDataModule(val_shards=folder, test_shards=folder, fields="tokens", max_batch_size=4,
                          max_batch_seconds=100.0)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(stage, datamodule=dm)[0]
    for key in ("val/gen_wer", "val/gen_cer", "val/real_wer", "val/real_cer"):
        assert key in metrics, key

    # The same figures by hand: decode both code sequences with the RVQ, transcribe, score.
    dm = SpeechDataModule(val_shards=folder, fields="tokens", max_batch_size=4, max_batch_seconds=100.0)
    dm.setup("validate")
    refs, gen_hyps, real_hyps = [], [], []
    for batch in dm.val_dataloader():
        texts, codes = stage._real(batch)
        gen = stage._generate(texts)
        refs += [normalize_transcript(t, "en") for t in texts]
        gen_hyps += stage._transcribe([stage._states(g) for g in gen])
        real_hyps += stage._transcribe([stage._states(c) for c in codes])
    assert sorted(set(refs)) == ["0", "2 hello hello hello", "one hello"]  # Whisper's English normaliser
    norm = lambda hyps: [normalize_transcript(h, "en") for h in hyps]  # noqa: E731
    assert set(norm(real_hyps)) == {"hello hello hello hello"}  # 4 tokens: the budget of a short utterance
    assert 0 < metrics["val/real_wer"] < 10
    assert metrics["val/gen_wer"] == pytest.approx(float(WordErrorRate()(norm(gen_hyps), refs)))
    assert metrics["val/real_wer"] == pytest.approx(float(WordErrorRate()(norm(real_hyps), refs)))
    assert metrics["val/real_cer"] == pytest.approx(float(CharErrorRate()(norm(real_hyps), refs)))
    assert len(stage._real_transcripts) == len(set(WORDS))  # real transcripts cached per distinct codes

    test = trainer.test(stage, datamodule=SpeechDataModule(test_shards=folder, fields="tokens", max_batch_size=4,
                                                           max_batch_seconds=100.0))[0]
    assert test["test/real_wer"] == pytest.approx(metrics["val/real_wer"])


def test_asr_decoder_choice_follows_the_stage1_encoder(asr_world, tmp_path):
    from stages.stage2 import asr_source

    _, _, info = asr_world
    enc = info["encoder"]
    assert asr_source("auto", enc, where="s1") == enc["source"]
    assert asr_source(None, enc, where="s1") is None
    assert asr_source("auto", {**enc, "source": None}, where="s1") is None  # random weights: nothing to reload
    assert asr_source("auto", {"kind": "gemma4_audio", "source": "google/gemma-4-E2B-it"}, where="s1") is None
    assert asr_source("auto", None, where="s1") is None  # stage 1 trained from cached states
    assert asr_source("auto", {**enc, "level_db": -20.0}, where="s1") == enc["source"]  # still Whisper states
    assert asr_source("auto", {**enc, "window": "clip"}, where="s1") == enc["source"]  # read about as well
    assert asr_source("auto", {**enc, "center_states": True}, where="s1") is None  # the mean the decoder needs is gone
    with pytest.raises(ValueError, match="center_states"):
        asr_source("other/whisper", {**enc, "center_states": True}, where="s1")
    with pytest.raises(ValueError, match="gemma4_audio"):
        asr_source("other/whisper", {"kind": "gemma4_audio"}, where="s1")
    assert _asr_stage(asr_world, asr_decoder=None).asr is None
    from demo.tiny import save_whisper_debug

    narrow = save_whisper_debug(tmp_path / "narrow", WORDS, d_model=16)
    with pytest.raises(ValueError, match="16-dim"):
        _asr_stage(asr_world, asr_decoder=str(narrow))


def _asr_rank(rank: int, world: int, port: int, root: str, lm_dir: str, out_dir: str) -> None:
    """One gloo rank: validate its share of the batches, record what ``_eval_epoch_end`` logs."""
    import pickle

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lm = SpeechLM(lm=lm_dir, tokenizer=lm_dir, num_levels=Q, codebook_size=K)
        stage = SpeechlessStage(lm=lm, stage1_artifact=f"{root}/artifacts/stage1/current", gen_max_frames=8,
                                asr_max_new_tokens=6)
        logged: dict[str, float] = {}
        stage.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
        dm = SpeechDataModule(val_shards=f"{root}/tokens", fields="tokens", max_batch_size=1, max_batch_seconds=100.0)
        dm.setup("validate")
        for idx, batch in enumerate(dm.val_dataloader()):
            if world == 1 or (idx < 2) == (rank == 0):  # rank 0 validates 2 batches, rank 1 the other 4
                stage.validation_step(batch, idx)
        stage._flush("val")
        metric = stage.val_real_wer
        logged["local_real_wer"] = float(metric.errors.sum() / metric.total.sum())  # before the sync
        stage._eval_epoch_end("val")
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(logged, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_wer_over_two_ranks_is_the_single_process_figure(asr_world, tmp_path, monkeypatch, free_port):
    import pickle
    from pathlib import Path

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root, lm_dir, _ = asr_world
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawn re-imports this module
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _asr_rank(0, 1, free_port, str(root), str(lm_dir), str(tmp_path / "one"))
    mp.spawn(_asr_rank, args=(2, free_port, str(root), str(lm_dir), str(tmp_path / "two")), nprocs=2, join=True)
    one = pickle.loads((tmp_path / "one" / "rank0.pkl").read_bytes())
    ranks = [pickle.loads((tmp_path / "two" / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    # Each rank's own figure differs from the total: the logged one is the sum over ranks.
    assert any(r["local_real_wer"] != pytest.approx(one["val/real_wer"]) for r in ranks), (one, ranks)
    for key in ("val/gen_wer", "val/gen_cer", "val/real_wer", "val/real_cer"):
        assert key in one, key
        assert ranks[0][key] == pytest.approx(one[key]) and ranks[1][key] == pytest.approx(one[key]), key
