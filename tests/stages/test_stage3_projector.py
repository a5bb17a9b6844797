"""Stage 3 through a trainable projector: a tiny random Whisper encoder's states into a tiny Gemma 3.

The stage-1 artifact sits on a tiny random Whisper encoder saved to a folder (a non-Gemma encoder, as a
real run would name ``openai/whisper-small``); the LLM is a tiny random Gemma 3 (``Gemma3ForCausalLM``,
no audio tower). The fast tests fit the LightningModule, check what a checkpoint holds, promote and
answer through ``speechless-infer``; the slow ones run the shipped ``configs/stage3_llm_projector.yaml``
through ``python -m stages fit`` on 1 and 2 gloo ranks in a fresh folder with the data at the config's
own relative paths, overriding only models (and the sizes that must match them), device and steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lightning import Trainer

from datamodules.instructions import InstructionDataModule
from datamodules.shards import ShardWriter
from demo.tasks import CLOSED_TASK, DIGITS, next_digit
from demo.tiny import whisper_debug_config
from models.encoders import WhisperEncoder
from models.projector import AudioProjector
from models.rvq import ResidualVQ
from models.spoken_llm import SpokenLLM
from stages.artifacts import ArtifactModule, load_artifact, promote
from stages.stage3 import SpokenInstructionStage, attach_stage1, collate_instructions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
Q, K, D, STACK = 2, 16, 32, 4  # RVQ levels, codes per level, the Whisper's d_model, frames per LLM position


def save_tiny_whisper(path: Path, *, seed: int = 0) -> Path:
    """A random tiny Whisper (1 s window, 50 frames/s) and its feature extractor, loadable as ``source=``."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    WhisperModel(whisper_debug_config(d_model=D, encoder_layers=1, max_source_positions=50)).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(path)
    return path


def stage1_artifact(artifacts_dir: Path, encoder_dir: Path, *, levels: int = Q, codes: int = K, seed: int = 0) -> Path:
    """A promoted stage-1 artifact over the Whisper encoder (an untrained RVQ), as stage 1 writes one."""
    enc_args = {"source": str(encoder_dir)}
    encoder = WhisperEncoder(**enc_args)
    init = {"dim": encoder.dim, "num_quantizers": levels, "codebook_size": codes, "kmeans_init": False, "seed": seed}
    return promote(
        stage="stage1",
        modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, ResidualVQ(**init).state_dict()),
                 "encoder": ArtifactModule("models.encoders.WhisperEncoder", enc_args)},
        metrics={}, artifacts_dir=artifacts_dir,
        info={"num_quantizers": levels, "codebook_size": codes, "dim": encoder.dim, "encoder": encoder.describe()},
    ).path  # fmt: skip


def write_instruction_data(root: Path, *, levels: int = Q, codes: int = K) -> None:
    """``data/synthetic/{train,val}`` token shards and ``data/raw/text_instructions.jsonl`` under ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        with ShardWriter(root / "data" / "synthetic" / split, prefix=split, kind="tokens") as writer:
            for i in range(n):
                frames = rng.integers(0, codes, size=(levels, 5 + i % 6)).astype(np.int64)  # 5..10: k = 4 leaves rests
                meta = {"instruction": DIGITS[i % 10], "response": DIGITS[(i + 1) % 10], "n_frames": frames.shape[1]}
                writer.write({"__key__": f"{split}{i}", "json": meta, "codes.npy": frames}, seconds=0.2)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "text_instructions.jsonl").write_text("".join(
        json.dumps({"instruction": f"What comes after {w}?", "response": n}) + "\n" for w, n in zip(DIGITS, DIGITS[1:])))  # fmt: skip


def tone(seconds: float, f0: float = 160.0) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5)) * 0.2).astype(np.float32)


def write_wav(path: Path, seconds: float = 1.3) -> Path:
    """A voiced-like tone longer than the tiny Whisper's 1 s window (encoded in two pieces)."""
    sf.write(path, tone(seconds), 16_000)
    return path


def write_speech(out: Path) -> Path:
    """Real-audio shards (spoken digits stand-ins) for the stage's spoken-accuracy validation."""
    from datamodules.audio import encode_flac

    with ShardWriter(out, prefix="speech") as writer:
        for i in range(3):
            wave = tone(0.5 + 0.3 * i, 120 + 40 * i)
            meta = {"text": DIGITS[i], "answer": next_digit(DIGITS[i]), "language": "en", "speaker": "s0", "duration": len(wave) / 16_000, "source": "tone"}
            writer.write({"__key__": f"s{i}", "flac": encode_flac(wave), "json": meta})
    return out


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    from demo.tiny import save_gemma3_lm_debug

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("stage3_projector")
    texts = [" ".join(DIGITS), "What comes after three? four. Answer the spoken question."] * 20
    lm = save_gemma3_lm_debug(root / "gemma3", texts, vocab_size=300, hidden_size=32)
    whisper = save_tiny_whisper(root / "whisper")
    write_instruction_data(root)
    return {"root": root, "lm": lm, "whisper": whisper, "artifact": stage1_artifact(root / "artifacts", whisper),
            "wav": write_wav(root / "question.wav"), "speech": write_speech(root / "speech")}  # fmt: skip


def make_stage(setup_dir, **stage_kwargs) -> SpokenInstructionStage:
    llm = SpokenLLM(model=str(setup_dir["lm"]), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=4, lora_dropout=0.0,
                    audio_dim=D, projector_stack=STACK)  # fmt: skip
    return SpokenInstructionStage(llm=llm, stage1_artifact=str(setup_dir["artifact"]), lr=1e-2, **stage_kwargs)


def datamodule(setup_dir) -> InstructionDataModule:
    data = setup_dir["root"] / "data"
    return InstructionDataModule(train_shards=str(data / "synthetic" / "train"), val_shards=str(data / "synthetic" / "val"),
                                 text_jsonl=str(data / "raw" / "text_instructions.jsonl"), text_ratio=0.25, batch_size=4)  # fmt: skip


def test_a_stage1_encoder_of_another_width_is_refused(setup_dir):
    llm = SpokenLLM(model=str(setup_dir["lm"]), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=2, audio_dim=48)
    with pytest.raises(ValueError, match=r"gives 32-dim states but the projector reads 48: set llm.init_args.audio_dim: 32"):
        SpokenInstructionStage(llm=llm, stage1_artifact=str(setup_dir["artifact"]))


def test_fit_trains_lora_and_projector_and_checkpoint_holds_only_them(setup_dir, tmp_path):
    stage = make_stage(setup_dir, eval_audio_shards=str(setup_dir["speech"]), eval_task=CLOSED_TASK)  # validation hears real audio
    assert stage.llm.audio_path == "projector"  # "auto" on an LLM without an audio tower
    assert stage.llm.encoder.describe()["kind"] == "whisper"  # the stage-1 artifact's encoder, attached
    frozen = {n: p.detach().clone() for n, p in stage.llm.named_parameters() if not p.requires_grad}
    before = stage.llm.trainable_state_dict()
    data = datamodule(setup_dir)
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(stage, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert 0.0 <= float(trainer.callback_metrics["val/spoken_accuracy"]) <= 1.0  # Whisper -> RVQ -> projector -> LLM
    after = stage.llm.trainable_state_dict()
    projector_keys = {k for k in after if k.startswith("projector.")}
    assert projector_keys and all(not torch.equal(after[k], before[k]) for k in projector_keys)  # every projector weight moved
    assert any(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)
    params = dict(stage.llm.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())  # the base LLM did not move

    ckpt = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {k for k in saved if k.startswith("llm.projector.")} == {f"llm.{k}" for k in projector_keys}
    assert set(saved) == {f"llm.{k}" if k.startswith("projector.") else f"llm.peft_model.{k}" for k in after}
    assert sum(v.numel() for v in saved.values()) < 0.5 * sum(p.numel() for p in stage.llm.parameters())

    fresh = make_stage(setup_dir)
    resumed = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    resumed.fit(fresh, datamodule=data, ckpt_path=ckpt)  # max_steps reached: restores, trains nothing more
    restored = fresh.llm.trainable_state_dict()
    assert all(torch.equal(restored[k], after[k]) for k in after)
    with pytest.raises(KeyError, match="trainable state mismatch"):
        fresh.on_load_checkpoint({"state_dict": {k: v for k, v in saved.items() if not k.startswith("llm.projector.")}})


def test_promoted_projector_reloads_and_infer_answers_as_the_trained_model(setup_dir, tmp_path, capsys):
    from stages.infer import main as infer

    stage = make_stage(setup_dir)
    batch = collate_instructions([stage.llm.example(instruction_text=None, codes=torch.randint(0, K, (Q, 7)), response="two")],
                                 pad_id=stage.llm.pad_id)  # fmt: skip
    opt = torch.optim.AdamW([p for p in stage.llm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        stage.llm(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    stage.llm.eval()
    config = {"model": {"init_args": {"llm": {"class_path": "models.spoken_llm.SpokenLLM",
                                              "init_args": {"model": str(setup_dir["lm"]), "audio_dim": D}}}}}  # fmt: skip
    result = promote(stage="stage3", modules=stage.artifact_modules(config), metrics={},
                     artifacts_dir=tmp_path / "artifacts", info=stage.artifact_info())  # fmt: skip
    info = json.loads((result.path / "config.json").read_text())["info"]
    assert info["audio_path"] == "projector" and info["rvq_round_trip"] is True
    assert info["projector"] == {"input_dim": D, "output_dim": 32, "stack": STACK, "hidden_dim": 32, "activation": "gelu"}
    assert info["encoder"]["kind"] == "whisper"
    assert (result.path / "llm" / "adapter" / "projector.safetensors").is_file()
    # The artifact rebuilds the projector as a project class from JSON + safetensors, with the trained weights.
    rebuilt = load_artifact(result.path, names=["projector"])["modules"]["projector"]
    assert isinstance(rebuilt, AudioProjector)
    for name, value in stage.llm.projector.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], value, atol=0, rtol=0)

    # speechless-infer: the recorded stage-1 artifact's Whisper -> RVQ round trip -> projector -> merged LLM.
    out = tmp_path / "answers.jsonl"
    assert infer(["--artifact", str(result.path), "--audio", str(setup_dir["wav"]), "--dtype", "fp32",
                  "--max-new-tokens", "5", "--output", str(out)]) == 0  # fmt: skip
    answer = json.loads(out.read_text())["answer"]
    assert answer  # a few greedy tokens of a random model: equal below only if the same model answers
    attach_stage1(stage.llm, str(setup_dir["artifact"]), encoder=True)  # the trained model hears the same wav
    wave, _ = sf.read(setup_dir["wav"], dtype="float32")
    prompts = stage.llm.prompts_from_audio([wave])
    assert prompts["audio_lengths"].tolist() == [65] and int(prompts["audio_positions"].sum()) == 17  # ceil(65 / 4)
    assert [answer] == [a.strip() for a in stage.llm.generate({**prompts, "rvq_round_trip": True}, max_new_tokens=5)]
    # Another stage-1 artifact (other codes, same encoder) is refused, not silently used.
    other = stage1_artifact(tmp_path / "other", setup_dir["whisper"], seed=1)
    with pytest.raises(SystemExit, match="not the stage-1 artifact"):
        infer(["--artifact", str(result.path), "--stage1", str(other), "--audio", str(setup_dir["wav"])])


# ------------------------------------------------------------------ the shipped config through the CLI
LEVELS, CODES = 8, 32  # the config's 8 levels; 32 codes per level


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=420)
    assert result.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2], ids=["1rank", "2ranks"])
def test_shipped_projector_config_fits_promotes_and_answers_a_wav(setup_dir, tmp_path, world):
    # A fresh folder laid out as the config expects: artifacts/stage1/current, data/synthetic, data/raw.
    run = tmp_path / "run"
    stage1_artifact(run / "artifacts", setup_dir["whisper"], levels=LEVELS, codes=CODES)
    write_instruction_data(run, levels=LEVELS, codes=CODES)
    config = str(ROOT / "configs" / "stage3_llm_projector.yaml")
    llm = "--model.init_args.llm.init_args."
    _run([sys.executable, "-m", "stages", "fit", "--config", config,
          "--trainer.accelerator", "cpu", "--trainer.devices", str(world), "--trainer.max_epochs", "2",
          f"{llm}model", str(setup_dir["lm"]), f"{llm}codebook_size", str(CODES), f"{llm}audio_dim", str(D)], run)  # fmt: skip
    current = run / "artifacts" / "stage3" / "current"
    info = json.loads((current / "config.json").read_text())["info"]
    assert info["input_mode"] == "embeddings" and info["audio_path"] == "projector" and info["encoder"]["kind"] == "whisper"
    assert info["projector"]["stack"] == 2 and info["num_levels"] == LEVELS  # the file's own settings
    assert (current / "llm" / "adapter" / "projector.safetensors").is_file() and (current / "llm" / "merged").is_dir()
    out = _run([str(Path(sys.executable).parent / "speechless-infer"), "--artifact", "artifacts/stage3/current",
                "--audio", str(setup_dir["wav"]), "--max-new-tokens", "3"], run)  # fmt: skip
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 1 and isinstance(answers[0]["answer"], str)


def test_shipped_projector_config_resolves_without_download(capsys):
    from stages.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(ROOT / "configs" / "stage3_llm_projector.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    llm = resolved["model"]["init_args"]["llm"]["init_args"]
    assert llm["model"] == "google/gemma-3-1b-it" and llm["input_mode"] == "embeddings" and llm["audio_path"] == "projector"
    assert llm["audio_dim"] == 1024 and llm["projector_stack"] == 2 and llm["gradient_checkpointing"] is True
    assert resolved["model"]["init_args"]["rvq_round_trip"] is True
    trainer = resolved["trainer"]
    assert trainer["precision"] == "bf16-mixed" and "DDPStrategy" in trainer["strategy"]["class_path"]
    assert not trainer["strategy"]["init_args"].get("static_graph") and trainer["accumulate_grad_batches"] > 1


def test_fit_with_a_base_text_teacher_on_the_projector_path(setup_dir, tmp_path):
    # The text teacher reads no audio: on the projector path it is the base LM with adapters (and the
    # placeholder rows) off; the projector still trains from the CE and the KL of the spoken rows.
    stage = make_stage(setup_dir, text_teacher="base", pack=True, max_tokens_per_row=256)
    before = stage.llm.trainable_state_dict()
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(stage, datamodule=datamodule(setup_dir))
    kl = float(trainer.callback_metrics["train/kl"])
    assert np.isfinite(kl) and kl > 0
    after = stage.llm.trainable_state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in after if k.startswith("projector."))
