"""Stage 3 LightningModule: response-only loss, a LoRA training run, adapter-only checkpoints, real config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer

from datamodules.instructions import InstructionDataModule
from datamodules.shards import ShardWriter
from demo.tasks import CLOSED_TASK, next_digit
from demo.tiny import save_gemma4_llm_debug
from models.chat_format import IGNORE_INDEX, build_example
from models.rvq import ResidualVQ
from models.spoken_llm import SpokenLLM
from stages.artifacts import ArtifactModule, promote
from stages.stage3 import SpokenInstructionStage, collate_instructions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
Q, K = 2, 16


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("stage3")
    model = save_gemma4_llm_debug(root / "llm", seed=0)
    rvq = ResidualVQ(dim=32, num_quantizers=Q, codebook_size=K, kmeans_init=False)  # tiny audio tower width
    init = {"dim": 32, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    artifact = promote(
        stage="stage1",
        modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, rvq.state_dict())},
        metrics={},
        artifacts_dir=root / "artifacts",
    ).path
    rng = np.random.default_rng(0)
    with ShardWriter(root / "tokens", prefix="tokens", kind="tokens") as writer:
        for i in range(8):
            word = ("zero", "one", "two", "three")[i % 4]
            codes = rng.integers(0, K, size=(Q, 5 + i)).astype(np.int64)
            writer.write({"__key__": f"u{i}", "json": {"text": word, "answer": next_digit(word), "n_frames": codes.shape[1]}, "codes.npy": codes}, seconds=0.5)
    return {"root": root, "model": model, "artifact": artifact, "tokens": root / "tokens"}


def make_stage(setup_dir, **kwargs) -> SpokenInstructionStage:
    llm = SpokenLLM(model=str(setup_dir["model"]), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=4, lora_dropout=0.0)
    return SpokenInstructionStage(llm=llm, stage1_artifact=str(setup_dir["artifact"]), lr=1e-2, **kwargs)


def spoken_batch(stage: SpokenInstructionStage) -> dict:
    tok = stage.llm.tokenizer
    codes = [torch.randint(0, K, (Q, 6)), torch.randint(0, K, (Q, 4))]
    examples = [
        {**build_example(tok, instruction_text=None, audio_frames=6, response="two"), "codes": codes[0]},
        build_example(tok, instruction_text="What comes after three?", audio_frames=None, response="four"),
        {**build_example(tok, instruction_text=None, audio_frames=4, response="nine"), "codes": codes[1]},
    ]
    return collate_instructions(examples, pad_id=stage.llm.pad_id)


def test_stage1_mismatch_is_a_clear_error(setup_dir):
    llm = SpokenLLM(model=str(setup_dir["model"]), dtype="fp32", num_levels=Q + 1, codebook_size=K, lora_r=4)
    with pytest.raises(ValueError, match="levels"):
        SpokenInstructionStage(llm=llm, stage1_artifact=str(setup_dir["artifact"]))


def test_loss_is_on_the_response_only(setup_dir):
    stage = make_stage(setup_dir)
    batch = spoken_batch(stage)
    assert batch["codes"].shape == (2, Q, 6) and batch["code_lengths"].tolist() == [6, 4]
    assert int(batch["codes"][1, :, 4:].max()) == -1  # padded frames of the shorter segment
    tok = stage.llm.tokenizer
    for row, answer in zip(batch["labels"], ("two", "four", "nine"), strict=True):
        labelled = row[row != IGNORE_INDEX].tolist()
        # The answer and the end-of-turn token, nothing of the prompt or the audio.
        assert tok.decode(labelled, skip_special_tokens=True).strip() == answer
        assert len(labelled) <= len(tok(answer, add_special_tokens=False)["input_ids"]) + 2
    loss = stage.training_step(batch, 0)
    out = stage.llm(batch, return_logits=True)
    logits, labels = out["logits"][:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(loss, expected, atol=1e-5)
    everything = F.cross_entropy(logits[batch["attention_mask"][:, 1:].bool()].float(),
                                 batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:].bool()])  # fmt: skip
    assert not torch.allclose(loss, everything, atol=1e-3)  # the prompt really is out of the loss



def test_packed_batches_give_the_padded_loss_with_audio_in_row_order(setup_dir):
    stage = make_stage(setup_dir)
    tok, pad = stage.llm.tokenizer, stage.llm.pad_id
    gen = torch.Generator().manual_seed(0)
    examples = [
        {**build_example(tok, instruction_text=None, audio_frames=n, response=r), "codes": torch.randint(0, K, (Q, n), generator=gen)}
        for n, r in ((6, "two"), (3, "four"), (9, "nine five"), (4, "one"))
    ] + [build_example(tok, instruction_text="What comes after three?", audio_frames=None, response="four")]  # fmt: skip
    padded = collate_instructions(examples, pad_id=pad)
    packed = collate_instructions(examples, pad_id=pad, pack=True, max_tokens_per_row=96)
    assert packed["input_ids"].shape[0] < len(examples) and "attention_mask" not in packed
    assert int(packed["real_tokens"]) == int(padded["attention_mask"].sum()) == sum(e["input_ids"].numel() for e in examples)
    assert int(packed["real_tokens"]) / packed["input_ids"].numel() > int(padded["real_tokens"]) / padded["input_ids"].numel()
    with torch.no_grad():
        want, got = stage.llm(padded), stage.llm(packed)
        assert int(got["n_tokens"]) == int(want["n_tokens"])
        torch.testing.assert_close(got["ce"], want["ce"], atol=1e-5, rtol=1e-5)
        # The audio fills the slots in row order: the same codes in example order give another loss.
        assert packed["code_lengths"].tolist() != padded["code_lengths"].tolist()
        swapped = {**packed, "codes": padded["codes"], "code_lengths": padded["code_lengths"]}
        assert not torch.allclose(stage.llm(swapped)["ce"], want["ce"], atol=1e-4)
    # A padding batch's example (sample_weight 0) adds no loss.
    muted = collate_instructions([{**examples[0], "sample_weight": 0.0}, *examples[1:]], pad_id=pad, pack=True)
    assert muted["sample_weight"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    with torch.no_grad():
        assert int(stage.llm(muted)["n_tokens"]) == int(want["n_tokens"]) - int((examples[0]["labels"] != IGNORE_INDEX).sum())


def test_fit_with_packing_logs_the_real_token_share(setup_dir, tmp_path):
    stage = make_stage(setup_dir, pack=True, max_tokens_per_row=128)
    data = InstructionDataModule(train_shards=str(setup_dir["tokens"]), instruction_key="text", response_key="answer",
                                 batch_size=8)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(stage, datamodule=data)
    share = float(trainer.callback_metrics["train/real_token_share"])
    assert 0.9 < share <= 1.0

def test_fit_trains_lora_and_checkpoint_holds_only_the_adapter(setup_dir, tmp_path):
    stage = make_stage(setup_dir)
    frozen_before = stage.llm.base.model.language_model.layers[0].mlp.gate_proj.base_layer.weight.clone()
    lora_before = {k: v.clone() for k, v in stage.llm.trainable_state_dict().items()}
    data = InstructionDataModule(
        train_shards=str(setup_dir["tokens"]), val_shards=str(setup_dir["tokens"]),
        instruction_key="text", response_key="answer", batch_size=4,
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(stage, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    after = stage.llm.trainable_state_dict()
    assert any(not torch.equal(after[k], lora_before[k]) for k in after)
    assert torch.equal(frozen_before, stage.llm.base.model.language_model.layers[0].mlp.gate_proj.base_layer.weight)

    ckpt = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]  # what a --ckpt_path URL is loaded with
    assert set(saved) == {f"llm.peft_model.{k}" for k in after}
    assert all("lora_" in k for k in saved)

    fresh = make_stage(setup_dir)
    assert any(not torch.equal(fresh.llm.trainable_state_dict()[k], after[k]) for k in after)
    resumed = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    resumed.fit(fresh, datamodule=data, ckpt_path=ckpt)  # max_steps reached: restores, trains nothing more
    assert resumed.global_step == 4
    restored = fresh.llm.trainable_state_dict()
    assert all(torch.equal(restored[k], after[k]) for k in after)


def test_wrong_adapter_is_refused(setup_dir):
    stage = make_stage(setup_dir)
    with pytest.raises(KeyError, match="trainable state mismatch"):
        stage.on_load_checkpoint({"state_dict": {"llm.peft_model.nope": torch.zeros(1)}})


def test_stage1_encoder_normalisation_reaches_real_speech(setup_dir, tmp_path):
    # Without normalisation recorded, real speech reaches the LLM unnormalised ...
    plain = make_stage(setup_dir)
    assert (plain.llm.level_db, plain.llm.center_states) == (None, False)
    # ... with it, stage 3 applies what the stage-1 encoder applied, and its artifact records it.
    rvq = ResidualVQ(dim=32, num_quantizers=Q, codebook_size=K, kmeans_init=False)
    init = {"dim": 32, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    encoder = {"kind": "gemma4_audio", "dim": 32, "level_db": -20.0, "center_states": True}
    artifact = promote(
        stage="stage1", modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, rvq.state_dict())},
        metrics={}, artifacts_dir=tmp_path / "artifacts", info={"encoder": encoder},
    ).path
    llm = SpokenLLM(model=str(setup_dir["model"]), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=4)
    stage = SpokenInstructionStage(llm=llm, stage1_artifact=str(artifact))
    assert (stage.llm.level_db, stage.llm.center_states) == (-20.0, True)
    assert stage.artifact_info()["audio_normalization"] == {"level_db": -20.0, "center_states": True}


def test_real_config_resolves_without_download():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "stages", "fit", "--config", "configs/stage3_llm.yaml", "--print_config"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for needle in ("google/gemma-4-E4B-it", "lora_r: 16", "precision: bf16-mixed", "DDPStrategy",
                   "gradient_checkpointing: true", "stages.stage3.SpokenInstructionStage"):  # fmt: skip
        assert needle in text, needle


def test_infer_scores_exact_match_and_normalised_wer():
    from stages.tasks import score

    assert score(["Eight.", "one two", ""], ["eight", "two", "three"], mode="exact") == {"accuracy": 1 / 3}
    wer = score(["Hello, World!", "colour"], ["hello world", "color"], mode="transcription")
    assert wer["wer"] == 0.0 and wer["cer"] == 0.0  # punctuation, case and British spelling normalised
    assert score(["hello there"], ["hello world"], mode="transcription")["wer"] == 0.5


def test_batches_split_over_ranks_exactly_once():
    from datamodules.instructions import length_sorted_batches
    from datamodules.ranks import split_for_ranks

    batches = length_sorted_batches(list(range(37)), batch_size=4, seed=0)  # 10 batches, 37 examples
    for world in (1, 2, 3, 4):
        per_rank = split_for_ranks(batches, world)
        assert len({len(r) for r in per_rank}) == 1
        seen = sorted(i for rank in per_rank for b in rank for i in b)
        assert seen == list(range(37))


def test_global_batches_take_the_same_steps_on_any_number_of_ranks():
    from datamodules.instructions import length_sorted_batches
    from datamodules.ranks import split_global_batches

    batches = length_sorted_batches(list(range(37)), batch_size=8, seed=0)  # 5 global batches, the last of 5
    batches.append([99])  # a batch smaller than the world: merged into the one before it
    for world in (1, 2, 3):
        per_rank = split_global_batches(batches, world)
        assert len({len(r) for r in per_rank}) == 1 and all(b for r in per_rank for b in r)
        steps = [sorted(i for r in per_rank for i in r[k]) for k in range(len(per_rank[0]))]
        expected = [sorted(b) for b in batches[:-2]] + [sorted(batches[-2] + [99])] if world > 1 else [sorted(b) for b in batches]
        assert steps == expected  # step k on every rank together is the one-process batch k
    with pytest.raises(ValueError, match="cannot feed"):
        split_global_batches([[1]], 2)


# ---- spoken validation for any task: closed, repeat, a json field ------------------------------


def _tone(seconds: float, f0: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.shape)
    return (0.2 * np.sin(2 * np.pi * f0 * t) + noise).astype(np.float32)


def write_eval_shards(out: Path) -> Path:
    """Real-speech shards as speechless-prepare writes them: a short Twi recording, an English one cut
    into two pieces (text only on the recording: ``parent_text``), and a cut one with a piece missing."""
    from datamodules.audio import encode_flac

    base = {"speaker": "s0", "source": "test"}
    with ShardWriter(out, prefix="eval", max_samples=2) as writer:
        writer.write({"__key__": "tw1", "flac": encode_flac(_tone(0.8, 150, 0)),
                      "json": {**base, "text": "Ɔkɔɔ fie!", "reference": "Me pɛ nsuo.", "language": "tw", "duration": 0.8}})
        for i, (seconds, offset) in enumerate(((0.6, 0.0), (0.6, 0.6))):  # "en1" cut at 0.6 s
            writer.write({"__key__": f"en1-{i:03d}", "flac": encode_flac(_tone(seconds, 200 + 50 * i, i + 1)),
                          "json": {**base, "text": "", "parent_text": "It's ten dollars.", "text_scope": "parent",
                                   "parent": "en1", "segment": i, "offset": offset, "duration": seconds,
                                   "parent_duration": 1.2, "reference": "Ten dollars.", "language": "en"}})
        writer.write({"__key__": "en2-001", "flac": encode_flac(_tone(0.5, 300, 9)),  # its piece 0 is elsewhere
                      "json": {**base, "text": "", "parent_text": "Hello there.", "text_scope": "parent",
                               "parent": "en2", "segment": 1, "offset": 0.5, "duration": 0.5,
                               "parent_duration": 1.0, "reference": "Hi.", "language": "en"}})  # fmt: skip
    return out


class AnswerSpy:
    """Runs the model's real ``generate`` (so the prompts are built and heard), records each prompt's
    audio slots, and answers with the given texts in order so the scores can be checked exactly."""

    def __init__(self, llm: SpokenLLM, answers: list[str]) -> None:
        self.llm, self.answers, self.slots, self.real = llm, list(answers), [], llm.generate

    def __call__(self, batch, max_new_tokens=64, **kw):
        audio_id = self.llm.base.config.audio_token_id
        self.slots.extend((batch["input_ids"] == audio_id).sum(1).tolist())
        self.max_new_tokens = max_new_tokens
        n = len(self.real(batch, max_new_tokens=1, **kw))
        out, self.answers = self.answers[:n], self.answers[n:]
        return out


def test_open_task_scores_whole_recordings_by_wer_with_each_language_s_normaliser(setup_dir, tmp_path, monkeypatch):
    shards = write_eval_shards(tmp_path / "eval")
    stage = make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="repeat")
    assert stage.summary_metrics == ["val/loss", "val/spoken_wer", "val/spoken_cer", "val/spoken_accuracy"]
    spy = AnswerSpy(stage.llm, ["ɔkɔɔ fie", "it is 10 dollars"])
    monkeypatch.setattr(stage.llm, "generate", spy)
    scores = stage.spoken_scores()
    # en2 lacks a piece: left out. en1's two pieces are heard as one 1.2 s recording (25 frames/s).
    assert scores["n"] == 2 and len(spy.slots) == 2
    assert abs(spy.slots[0] - 0.8 * 25) <= 2 and abs(spy.slots[1] - 1.2 * 25) <= 2, spy.slots
    # Twi keeps its letters (basic normaliser); English "It's ten dollars." and the answer both read "it is $10".
    assert scores == {"accuracy": 1.0, "wer": 0.0, "cer": 0.0, "n": 2}
    assert spy.max_new_tokens >= 16  # an open task's answer is not cut at a closed task's 4 tokens

    # eval_language overrides every utterance's own: the basic normaliser leaves "it s ten dollars".
    basic = make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="repeat", eval_language="tw")
    monkeypatch.setattr(basic.llm, "generate", AnswerSpy(basic.llm, ["ɔkɔɔ fie", "it is ten dollars"]))
    assert basic.spoken_scores()["wer"] == pytest.approx(1 / 6)  # 1 substitution in 2 + 4 reference words


def test_a_json_field_task_takes_each_recording_s_own_reference(setup_dir, tmp_path, monkeypatch):
    shards = write_eval_shards(tmp_path / "eval")
    stage = make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="json:reference")
    monkeypatch.setattr(stage.llm, "generate", AnswerSpy(stage.llm, ["me pɛ nsuo", "ten pounds"]))
    scores = stage.spoken_scores()
    # English normalises "Ten dollars." to "$10" and "ten pounds" to "£10": 1 error in 3 + 1 words.
    assert scores["n"] == 2 and scores["wer"] == pytest.approx(1 / 4) and scores["accuracy"] == 0.5
    from stages.tasks import eval_reference

    with pytest.raises(ValueError, match=r"json\['answer'\]"):
        eval_reference("json:answer", {"text": "x"}, where="eval:u1")
    # A field the shards lack is refused when the fit starts, not after its first epoch.
    with pytest.raises(ValueError, match=r"eval-000000.tar:tw1: eval_task 'json:answer' needs a non-empty json\['answer'\]"):
        make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="json:answer").on_fit_start()
    make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="repeat").on_fit_start()  # all have text
    with pytest.raises(ValueError, match="eval_task must be one of"):
        make_stage(setup_dir, eval_task="transcript")


def test_the_old_option_name_still_works_with_a_deprecation_message(setup_dir):
    with pytest.warns(DeprecationWarning, match="eval_task"):
        stage = make_stage(setup_dir, eval_closed_task="repeat")
    assert stage.eval_task == "repeat" and stage.eval_open


def test_the_checkpoint_table_shows_the_metrics_the_task_has(setup_dir, capsys):
    from stages.cli import print_checkpoint_table

    # No real speech to validate on: no spoken column (the table showed "val/spoken_accuracy nan").
    assert make_stage(setup_dir).summary_metrics == ["val/loss"]
    closed = make_stage(setup_dir, eval_audio_shards="somewhere", eval_task=CLOSED_TASK)
    assert closed.summary_metrics == ["val/loss", "val/spoken_accuracy"]
    print_checkpoint_table({"best": {"val/loss": 1.5}}, make_stage(setup_dir).summary_metrics)
    assert "nan" not in capsys.readouterr().out


def test_fit_chooses_checkpoints_by_spoken_wer_on_real_speech(setup_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    shards = write_eval_shards(tmp_path / "eval")
    stage = make_stage(setup_dir, eval_audio_shards=str(shards), eval_task="repeat", eval_max_new_tokens=6)
    data = InstructionDataModule(
        train_shards=str(setup_dir["tokens"]), val_shards=str(setup_dir["tokens"]),
        instruction_key="text", response_key=None, closed_task="repeat", batch_size=4,
    )  # fmt: skip
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/spoken_wer", mode="min", save_top_k=1)
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, limit_train_batches=1,
    )  # fmt: skip
    trainer.fit(stage, datamodule=data)
    metrics = trainer.callback_metrics
    assert {"val/spoken_wer", "val/spoken_cer", "val/spoken_accuracy"} <= set(metrics)
    assert torch.isfinite(metrics["val/spoken_wer"]) and float(metrics["val/spoken_wer"]) >= 0.0
    assert checkpoint.best_model_path and torch.isfinite(checkpoint.best_model_score)
    assert float(checkpoint.best_model_score) == min(float(s) for s in checkpoint.best_k_models.values())
