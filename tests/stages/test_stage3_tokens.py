"""Stage 3 for a text-only LM: the shipped tokens config through the CLI, promotion, speechless-infer.

``configs/stage3_llm_tokens.yaml`` runs with only models, data, device and step count overridden: a
tiny random Gemma 3 (``Gemma3ForCausalLM``) saved to a folder, a stage-1 artifact whose encoder is a
tiny Gemma 4 audio tower saved to a folder, synthetic instruction token shards and real (tone) audio.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.audio import encode_flac
from datamodules.instructions import InstructionDataModule
from datamodules.shards import ShardWriter
from demo.tasks import CLOSED_TASK, DIGITS, next_digit
from demo.tiny import save_gemma4_audio_debug
from models.encoders import Gemma4AudioEncoder
from models.rvq import ResidualVQ
from stages.artifacts import ArtifactModule, promote

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
Q, K = 2, 16


def stage1_artifact(root: Path, encoder_dir: Path, *, seed: int) -> Path:
    """A promoted stage-1 artifact: an (untrained) RVQ and its encoder by reference, as stage 1 writes them."""
    enc_args = {"source": str(encoder_dir), "level_db": -20.0}
    encoder = Gemma4AudioEncoder(**enc_args)
    init = {"dim": encoder.dim, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False, "seed": seed}
    rvq = ResidualVQ(**init)
    return promote(
        stage="stage1",
        modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, rvq.state_dict()),
                 "encoder": ArtifactModule("models.encoders.Gemma4AudioEncoder", enc_args)},
        metrics={}, artifacts_dir=root, info={"num_quantizers": Q, "codebook_size": K, "dim": encoder.dim,
                                              "encoder": encoder.describe()},
    ).path  # fmt: skip


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    from demo.tiny import save_gemma3_lm_debug

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("stage3_tokens")
    texts = [" ".join(DIGITS), "What comes after three? four. Answer the spoken question."] * 20
    lm = save_gemma3_lm_debug(root / "gemma3", texts, vocab_size=300, hidden_size=32)
    encoder_dir = save_gemma4_audio_debug(root / "encoder", seed=0)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        with ShardWriter(root / "synthetic" / split, prefix=split, kind="tokens") as writer:
            for i in range(n):
                word = DIGITS[i % 10]
                codes = rng.integers(0, K, size=(Q, 4 + i % 4)).astype(np.int64)
                meta = {"instruction": word, "response": DIGITS[(i + 1) % 10], "n_frames": codes.shape[1]}
                writer.write({"__key__": f"{split}{i}", "json": meta, "codes.npy": codes}, seconds=0.3)
    (root / "text.jsonl").write_text("".join(json.dumps({"instruction": f"What comes after {w}?", "response": n}) + "\n"
                                             for w, n in zip(DIGITS, DIGITS[1:], strict=False)))  # fmt: skip
    t = np.arange(16_000) / 16_000
    with ShardWriter(root / "speech", prefix="speech") as writer:
        for i in range(4):
            wave = (0.2 * np.sin(2 * np.pi * (120 + 40 * i) * t[: 8000 + 1600 * i])).astype(np.float32)
            meta = {"text": DIGITS[i], "answer": next_digit(DIGITS[i]), "language": "en", "speaker": "s0", "duration": len(wave) / 16_000, "source": "tone"}
            writer.write({"__key__": f"s{i}", "flac": encode_flac(wave), "json": meta})
    return {"root": root, "lm": lm, "encoder": encoder_dir, "artifact": stage1_artifact(root / "artifacts", encoder_dir, seed=0)}


def tokens_config(setup_dir, run: Path) -> Path:
    """The shipped config, with only models, data, device and step count overridden."""
    config = yaml.safe_load((ROOT / "configs" / "stage3_llm_tokens.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", devices=1, precision="32-true", strategy="auto", max_epochs=2,
                   accumulate_grad_batches=2, val_check_interval=1.0, log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "s3"}}
    trainer["callbacks"][-1]["init_args"]["artifacts_dir"] = str(run / "artifacts")
    model = config["model"]["init_args"]
    model.update(stage1_artifact=str(setup_dir["artifact"]), eval_audio_shards=str(setup_dir["root"] / "speech"), lr=1e-2,
                 eval_task=CLOSED_TASK)
    model["llm"]["init_args"].update(model=str(setup_dir["lm"]), dtype="fp32", num_levels=Q, codebook_size=K,
                                     sound_levels=Q, ctc_weight=0.5, lora_r=4, lora_alpha=8)  # fmt: skip
    config["data"]["init_args"].update(train_shards=str(setup_dir["root"] / "synthetic" / "train"), num_workers=0,
                                       val_shards=str(setup_dir["root"] / "synthetic" / "val"), batch_size=2,
                                       text_jsonl=str(setup_dir["root"] / "text.jsonl"))  # fmt: skip
    path = run / "stage3_tokens.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_tokens_config_fits_validates_promotes_and_answers_through_infer(setup_dir, tmp_path, capsys):
    from stages.cli import main as cli
    from stages.infer import main as infer

    run = tmp_path / "run"
    cli(["fit", "--config", str(tokens_config(setup_dir, run))])

    rows = list(csv.DictReader(open(next(run.glob("s3/version_*/metrics.csv")))))
    steps = [r for r in rows if r.get("train/ctc")]
    assert steps, "the CTC term never reached the logged loss"
    for r in steps:  # loss = ce + ctc_weight * ctc
        assert float(r["train/loss"]) == pytest.approx(float(r["train/ce"]) + 0.5 * float(r["train/ctc"]), rel=1e-4)
    assert any(r.get("val/spoken_accuracy") for r in rows)  # real speech via stage-1 encoder + RVQ -> tokens
    assert any(r.get("val/ctc") for r in rows)

    current = run / "artifacts" / "stage3" / "current"
    config = json.loads((current / "config.json").read_text())
    info = config["info"]
    assert info["input_mode"] == "tokens" and info["sound_tokens"]["levels"] == Q
    assert info["stage1"]["path"] == str(Path(setup_dir["artifact"]).resolve())
    assert info["encoder"]["kind"] == "gemma4_audio" and info["encoder"]["level_db"] == -20.0
    assert (current / "llm" / "merged" / "model.safetensors").is_file()
    assert (current / "llm" / "adapter" / "adapter_model.safetensors").is_file()
    merged_tok = json.loads((current / "llm" / "merged" / "tokenizer.json").read_text())
    assert any(t["content"] == "<|sound_l1_0015|>" for t in merged_tok["added_tokens"])

    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert infer(["--artifact", str(current), "--shards", str(setup_dir["root"] / "speech"), "--closed-task",
                  CLOSED_TASK, "--dtype", "fp32", "--max-new-tokens", "4", "--output", str(out)]) == 0  # fmt: skip
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["reference"] for a in answers] == ["one", "two", "three", "four"]
    assert all(isinstance(a["answer"], str) for a in answers)
    assert "4 scored: accuracy" in capsys.readouterr().err
    # Another stage-1 artifact writes other codes for the same speech: refused, not silently used.
    other = stage1_artifact(tmp_path / "other", setup_dir["encoder"], seed=1)
    with pytest.raises(SystemExit, match="not the stage-1 artifact"):
        infer(["--artifact", str(current), "--stage1", str(other), "--shards", str(setup_dir["root"] / "speech")])


def test_tokens_config_on_two_ranks_promotes(setup_dir, tmp_path):
    # after_fit validates and promotes on every rank: a collective asked by rank 0 alone would hang here.
    run = tmp_path / "run"
    path = tokens_config(setup_dir, run)
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(devices=2, max_epochs=1, strategy={
        "class_path": "lightning.pytorch.strategies.DDPStrategy",
        "init_args": {"find_unused_parameters": False, "process_group_backend": "gloo"}})  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "stages", "fit", "--config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spoken accuracy" in result.stdout and "[promote] stage3" in result.stdout
    info = json.loads((run / "artifacts" / "stage3" / "current" / "config.json").read_text())["info"]
    assert info["input_mode"] == "tokens"


def test_datamodule_supplies_ctc_targets_for_spoken_rows_only(setup_dir):
    from models.spoken_llm import SpokenLLM
    from stages.stage3 import collate_instructions

    llm = SpokenLLM(model=str(setup_dir["lm"]), input_mode="tokens", dtype="fp32", num_levels=Q, codebook_size=K, lora_r=2)
    data = InstructionDataModule(train_shards=str(setup_dir["root"] / "synthetic" / "train"), batch_size=16,
                                 text_jsonl=str(setup_dir["root"] / "text.jsonl"), text_ratio=0.5)  # fmt: skip
    data.bind(build_example=llm.example, collate=lambda b: collate_instructions(b, pad_id=llm.pad_id),
              ctc_targets=llm.ctc_targets)  # fmt: skip
    data.setup("fit")
    batches = list(data.train_dataloader())
    sound = torch.tensor(llm.new_token_ids)
    n_spoken = 0
    for batch in batches:
        spoken = torch.isin(batch["input_ids"], sound).any(1)
        assert "codes" not in batch  # tokens mode: the codes are in input_ids
        if not spoken.any():
            assert "ctc_targets" not in batch
            continue
        targets = batch["ctc_targets"]
        assert targets.shape[0] == int(spoken.sum())
        texts = [llm.tokenizer.decode(t[t >= 0]) for t in targets]
        assert all(t in DIGITS for t in texts), texts  # each spoken row's instruction text
        n_spoken += targets.shape[0]
    assert n_spoken == 12 and sum(b["input_ids"].shape[0] for b in batches) == 18


def test_real_tokens_config_resolves_without_download(capsys):
    from stages.cli import main as cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(ROOT / "configs" / "stage3_llm_tokens.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    llm = resolved["model"]["init_args"]["llm"]["init_args"]
    assert llm["model"] == "google/gemma-3-1b-it" and llm["input_mode"] == "tokens" and llm["lora_r"] == 16
    assert llm["gradient_checkpointing"] is True and llm["sound_levels"] == llm["num_levels"] == 8
    trainer = resolved["trainer"]
    assert trainer["precision"] == "bf16-mixed" and "DDPStrategy" in trainer["strategy"]["class_path"]
    # static_graph with gradient accumulation fails at the first backward: never in this config.
    assert not trainer["strategy"]["init_args"].get("static_graph") and trainer["accumulate_grad_batches"] > 1
