"""A fit killed with ``kill -9`` and resumed with ``--ckpt_path last.ckpt`` ends as if never killed.

Each test runs ``python -m stages fit`` in a subprocess three ways: uninterrupted; killed by SIGKILL
(``helpers/kill_at_step.py``, a real kill of the process, not an exception) some steps after a
checkpoint; and resumed from that run's ``last.ckpt`` with the same command plus ``--ckpt_path``.
The resumed run must log into the same ``version_0`` folder, train on the same batches in the same
order from the kill point on, and end with bit-identical weights in every checkpoint, the same set
of checkpoint files, and the same ``checkpoint_metrics.json`` figures as the uninterrupted run.

Stage 1 runs the RVQ with checkpoint averaging over the last validations (its buffer must survive)
and k-means; stage 3 a tiny Gemma 4 with LoRA dropout (the step's random state must survive), a
text/spoken mix drawn per epoch and validations inside the epoch. Both are killed at an epoch
boundary and inside an epoch (``ModelCheckpoint(every_n_train_steps=...)``). Marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent / "helpers"
TIMEOUT = 300


def _fit(cwd: Path, config: Path, *extra: str, env: dict[str, str], kill_at: int = -1, ok=(0,)) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO), env.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "stages", "fit", "--config", str(config), *extra,
           "--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step", str(kill_at),
           "--trainer.callbacks.record", str(cwd / "batches.jsonl")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode in ok, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _three_runs(root: Path, config_for, kill_at: int, env: dict[str, str]) -> dict[str, Path]:
    """Uninterrupted run in ``root/a``; killed then resumed run in ``root/b``."""
    runs = {}
    for name in ("a", "b"):
        cwd = root / name
        cwd.mkdir(parents=True)
        runs[name] = cwd
    _fit(runs["a"], config_for(runs["a"]), env=env)
    config_b = config_for(runs["b"])
    _fit(runs["b"], config_b, env=env, kill_at=kill_at, ok=(-9, 137))
    killed = [json.loads(line) for line in (runs["b"] / "batches.jsonl").read_text().splitlines()]
    assert killed[-1]["step"] == kill_at, "the run was not killed where asked"
    ckpts = runs["b"] / "runs" / "stage" / "version_0" / "checkpoints"
    assert (ckpts / "last.ckpt").exists() and not (runs["b"] / "runs" / "stage" / "version_1").exists()
    (runs["b"] / "batches.jsonl").rename(runs["b"] / "killed.jsonl")
    resumed_from = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < resumed_from < kill_at
    _fit(runs["b"], config_b, "--ckpt_path", str(ckpts / "last.ckpt"), env=env)
    runs["resumed_from"] = resumed_from
    return runs


def _assert_same_run(runs: dict) -> None:
    a, b = runs["a"], runs["b"]
    # One run folder, as if never killed.
    assert sorted(p.name for p in (b / "runs" / "stage").iterdir()) == ["version_0"]
    # The same batches from the resume point on (a replayed epoch order would differ here).
    full = [json.loads(line) for line in (a / "batches.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (b / "batches.jsonl").read_text().splitlines()]
    assert resumed and resumed[0]["step"] == runs["resumed_from"]
    assert resumed == [r for r in full if r["step"] >= runs["resumed_from"]]
    # The same checkpoint files with bit-identical weights.
    ca, cb = (r / "runs" / "stage" / "version_0" / "checkpoints" for r in (a, b))
    names = sorted(p.name for p in ca.glob("*.ckpt"))
    assert names == sorted(p.name for p in cb.glob("*.ckpt"))
    assert {"last.ckpt", "final.ckpt"} <= set(names)
    for name in names:
        sa = torch.load(ca / name, map_location="cpu", weights_only=True)
        sb = torch.load(cb / name, map_location="cpu", weights_only=True)
        assert sa["global_step"] == sb["global_step"], name
        assert sa["state_dict"].keys() == sb["state_dict"].keys()
        for key, value in sa["state_dict"].items():
            assert torch.equal(value, sb["state_dict"][key]), f"{name}: {key} differs"
    # The same figures for best, final (and averaged) checkpoints.
    ma, mb = (json.loads((r / "runs" / "stage" / "version_0" / "checkpoint_metrics.json").read_text()) for r in (a, b))
    assert ma["metrics"] == mb["metrics"] and ma["metrics"]


# ----------------------------------------------------------------------------------------- stage 1
def _stage1_config(stage1_config, corpus, *, every_n_steps: int | None):
    def make(cwd: Path) -> Path:
        path = stage1_config(corpus, cwd, max_epochs=4)
        config = yaml.safe_load(path.read_text())
        trainer = config["trainer"]
        trainer["logger"]["init_args"] = {"save_dir": "runs", "name": "stage"}  # no version: resume finds it
        ckpt, averaging, promote = trainer["callbacks"]
        ckpt["init_args"]["enable_version_counter"] = False
        averaging["init_args"] = {"n": 2, "mode": "last"}  # the buffer of recent weights must be restored
        promote["init_args"]["artifacts_dir"] = "artifacts"
        if every_n_steps:
            trainer["callbacks"].insert(1, {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": every_n_steps, "save_top_k": 0, "save_last": True,
                              "enable_version_counter": False},
            })  # fmt: skip
        config["model"]["init_args"]["quantizer"]["init_args"].update(quantizer_dropout=0.5, kmeans_buffer_frames=600)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make


def _batches_per_epoch(cwd: Path) -> int:
    rows = [json.loads(line) for line in (cwd / "batches.jsonl").read_text().splitlines()]
    return sum(1 for r in rows if r["epoch"] == 0)


def test_stage1_killed_at_an_epoch_boundary_resumes_exactly(make_stage1_config, tiny_corpus, tmp_path, offline_env):
    make = _stage1_config(make_stage1_config, tiny_corpus, every_n_steps=None)
    probe = tmp_path / "probe"
    probe.mkdir()
    _fit(probe, make(probe), "--trainer.max_epochs", "1", env=offline_env())
    n = _batches_per_epoch(probe)
    assert n >= 3
    runs = _three_runs(tmp_path, make, kill_at=2 * n + 1, env=offline_env())  # last.ckpt: the end of epoch 2 (step 2n)
    assert runs["resumed_from"] == 2 * n
    _assert_same_run(runs)
    averaged = runs["b"] / "runs" / "stage" / "version_0" / "checkpoints" / "averaging"
    assert len(list(averaged.glob("*.safetensors"))) >= 2  # the buffer's weights are on disk


def test_stage1_killed_inside_an_epoch_resumes_exactly(make_stage1_config, tiny_corpus, tmp_path, offline_env):
    make = _stage1_config(make_stage1_config, tiny_corpus, every_n_steps=2)
    probe = tmp_path / "probe"
    probe.mkdir()
    _fit(probe, make(probe), "--trainer.max_epochs", "1", env=offline_env())
    n = _batches_per_epoch(probe)
    # A step checkpoint inside epoch 1 (step c), and the kill one step after it.
    c = next(s for s in range(n + 1, 3 * n) if s % 2 == 0 and s % n)
    runs = _three_runs(tmp_path, make, kill_at=c + 1, env=offline_env())
    assert runs["resumed_from"] == c  # really a mid-epoch position
    _assert_same_run(runs)


# ----------------------------------------------------------------------------------------- stage 3
Q, K = 2, 16


@pytest.fixture(scope="module")
def stage3_setup(tmp_path_factory):
    from datamodules.shards import ShardWriter
    from demo.tasks import next_digit
    from demo.tiny import save_gemma4_llm_debug
    from models.rvq import ResidualVQ
    from stages.artifacts import ArtifactModule, promote

    root = tmp_path_factory.mktemp("resume3")
    model = save_gemma4_llm_debug(root / "llm", seed=0)
    init = {"dim": 32, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    artifact = promote(
        stage="stage1",
        modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, ResidualVQ(**init).state_dict())},
        metrics={},
        artifacts_dir=root / "artifacts",
    ).path
    rng = np.random.default_rng(0)
    words = ("zero", "one", "two", "three")
    with ShardWriter(root / "tokens", prefix="tokens", kind="tokens") as writer:
        for i in range(12):
            codes = rng.integers(0, K, size=(Q, 4 + i % 5)).astype(np.int64)
            writer.write({"__key__": f"u{i}", "json": {"text": words[i % 4], "answer": next_digit(words[i % 4]), "n_frames": codes.shape[1]}, "codes.npy": codes},
                         seconds=0.5)  # fmt: skip
    with open(root / "text.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"instruction": f"What comes after {words[i % 3]}?", "response": words[i % 3 + 1]}) + "\n")
    return {"model": model, "artifact": artifact, "tokens": root / "tokens", "text": root / "text.jsonl"}


def _stage3_config(setup, *, every_n_steps: int | None):
    def make(cwd: Path) -> Path:
        callbacks = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True, "save_top_k": 2,
                           "filename": "best-{step}", "enable_version_counter": False}},
            {"class_path": "stages.promote.Promote", "init_args": {"stage": "stage3", "artifacts_dir": "artifacts"}},
        ]  # fmt: skip
        if every_n_steps:
            callbacks.insert(1, {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": every_n_steps, "save_top_k": 0, "save_last": True,
                              "enable_version_counter": False},
            })  # fmt: skip
        config = {
            "seed_everything": 0,
            "trainer": {
                "use_distributed_sampler": False, "accelerator": "cpu", "devices": 1, "precision": "32-true",
                "max_epochs": 3, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                "enable_model_summary": False, "reload_dataloaders_every_n_epochs": 1, "log_every_n_steps": 1,
                "val_check_interval": 0.5, "accumulate_grad_batches": 1,
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "runs", "name": "stage"}},
                "callbacks": callbacks,
            },
            "model": {
                "class_path": "stages.stage3.SpokenInstructionStage",
                "init_args": {
                    "stage1_artifact": str(setup["artifact"]), "lr": 1.0e-2, "warmup_steps": 2,
                    "llm": {"class_path": "models.spoken_llm.SpokenLLM",
                            "init_args": {"model": str(setup["model"]), "dtype": "fp32", "num_levels": Q,
                                          "codebook_size": K, "lora_r": 4, "lora_dropout": 0.2}},
                },
            },
            "data": {
                "class_path": "datamodules.instructions.InstructionDataModule",
                "init_args": {"train_shards": str(setup["tokens"]), "val_shards": str(setup["tokens"]),
                              "text_jsonl": str(setup["text"]), "text_ratio": 0.5, "instruction_key": "text",
                              "response_key": "answer", "batch_size": 3, "seed": 0},
            },
        }  # fmt: skip
        path = cwd / "stage3.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make


def test_stage3_killed_at_an_epoch_boundary_resumes_exactly(stage3_setup, tmp_path, offline_env):
    # 12 spoken + 6 text examples in batches of 3: 6 batches an epoch, validations after 3 and 6.
    runs = _three_runs(tmp_path, _stage3_config(stage3_setup, every_n_steps=None), kill_at=7, env=offline_env())
    assert runs["resumed_from"] == 6
    _assert_same_run(runs)


@pytest.mark.parametrize(
    ("every_n_steps", "kill_at", "checkpoint"),
    [(None, 10, 9), (5, 11, 10)],
    ids=["validation-inside-epoch", "every-n-steps"],
)
def test_stage3_killed_inside_an_epoch_resumes_exactly(stage3_setup, tmp_path, every_n_steps, kill_at, checkpoint, offline_env):
    # Epoch 1 is steps 7-12; its first validation (val_check_interval 0.5) writes last.ckpt at step 9,
    # a ModelCheckpoint(every_n_train_steps=5) at step 10: both inside the epoch.
    runs = _three_runs(tmp_path, _stage3_config(stage3_setup, every_n_steps=every_n_steps), kill_at=kill_at,
                      env=offline_env())
    assert runs["resumed_from"] == checkpoint
    _assert_same_run(runs)
