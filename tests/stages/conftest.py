"""Fixtures shared by the stage tests: tiny speech shards and a tiny stage-1 config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from datamodules.audio import encode_flac
from datamodules.shards import ShardWriter


def write_speech_shards(out: Path, *, n: int, seed: int, per_shard: int = 7) -> Path:
    """``n`` clips of voiced-like tones (5 'words' = 5 pitch patterns), 0.4-1.2 s, as speech shards."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, prefix="shard", max_samples=per_shard) as writer:
        for i in range(n):
            word = i % 5
            seconds = float(rng.uniform(0.4, 1.2))
            t = np.arange(int(seconds * 16000)) / 16000
            f0 = 120 + 40 * word
            audio = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.2
            audio = (audio + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
            meta = {"text": f"word{word}", "language": "xx", "speaker": f"s{i % 3}", "duration": seconds, "source": "synthetic"}
            writer.write({"__key__": f"u{seed}_{i:03d}", "flac": encode_flac(audio), "json": meta})
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    from demo.tiny import save_gemma4_audio_debug

    root = tmp_path_factory.mktemp("corpus")
    shards = {split: write_speech_shards(root / split, n=n, seed=s) for split, n, s in (("train", 30, 0), ("val", 12, 1))}
    encoder = save_gemma4_audio_debug(root / "encoder", seed=0)
    return {"root": root, "encoder": encoder, **shards}


def stage1_config(corpus: dict[str, Path], run_dir: Path, *, max_epochs: int = 2, gates: dict | None = None) -> Path:
    """A stage-1 config like configs/demo/stage1_rvq.yaml, on the tiny corpus, writing under run_dir."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": max_epochs,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "stage1", "version": 0}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/cosine", "mode": "max", "save_last": True, "save_top_k": 2, "filename": "best-{epoch}"}},
                {"class_path": "stages.averaging.CheckpointAveraging", "init_args": {"n": 2, "mode": "top_k"}},
                {"class_path": "stages.promote.Promote",
                 "init_args": {"stage": "stage1", "gates": gates if gates is not None else {"val/cosine": {"min": 0.0}},
                               "compare_metric": "val/cosine", "artifacts_dir": str(run_dir / "artifacts")}},
            ],
        },
        "model": {
            "class_path": "stages.stage1.RVQStage",
            "init_args": {
                "encoder": {"class_path": "models.encoders.Gemma4AudioEncoder", "init_args": {"source": str(corpus["encoder"])}},
                "quantizer": {"class_path": "models.rvq.ResidualVQ",
                              "init_args": {"dim": 64, "num_quantizers": 2, "codebook_size": 16, "kmeans_buffer_frames": 200, "decay": 0.8}},
            },
        },
        "data": {
            "class_path": "datamodules.speech.SpeechDataModule",
            "init_args": {"train_shards": str(corpus["train"]), "val_shards": str(corpus["val"]),
                          "max_batch_seconds": 8.0, "max_batch_size": 16, "num_workers": 0},
        },
    }
    path = run_dir / "stage1.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def make_stage1_config():
    """The :func:`stage1_config` builder (importlib test mode cannot import conftest by name)."""
    return stage1_config


@pytest.fixture(scope="session")
def speech_shard_writer():
    """The :func:`write_speech_shards` writer, for tests that lay out their own corpora."""
    return write_speech_shards


@pytest.fixture
def run_demo(offline_env):
    """``run_demo(workdir, *args, timeout=s)``: ``python -m demo --workdir DIR *args`` in a new
    session, killed whole (every rank and worker) and failed on a timeout; asserts exit status 0."""
    return lambda workdir, *args, timeout: _demo(workdir, *args, timeout=timeout, env=offline_env())


def _demo(workdir: Path, *args: str, timeout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "demo", "--workdir", str(workdir), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank and worker, not just the demo runner
        stdout, stderr = proc.communicate()
        pytest.fail(f"hang: {' '.join(cmd)} did not finish in {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out
