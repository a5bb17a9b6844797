"""Stage-2 synthesis killed with ``kill -9`` and rerun: every instruction written exactly once.

Each run is the README's command, ``python -m stages predict`` over the shipped demo stage-2 config
with only models, data, device and step count overridden, in a session of its own. A killed run is
stopped by SIGKILL to its whole process group (every rank) once at least one shard is finished and
before the end; the same command is then run again. The merged JSONL and shards must hold every id
once, with the same codes as an uninterrupted run (decoding is greedy, and batched generation equals
per-sample generation, so an id's codes depend neither on the rank count nor on the restart). A
rerun after a complete run, on another rank count, runs no batch and leaves the output as it was. The stage-2 model is an untrained tiny
Gemma 3 (it rarely ends early, so each batch takes its full ``gen_max_frames``). Marked ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.shards import iter_tar_samples, read_index
from stages.writers import jsonl_records

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo" / "stage2_speechless.yaml"
TIMEOUT = 240
WORDS = ["zero", "one", "two", "three", "four"]
N = 80  # instructions; 2 per batch and per shard: 20 shards per rank on 2 ranks
Q, K = 2, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from demo.tiny import save_gemma3_lm_debug
    from models.rvq import ResidualVQ
    from models.speech_lm import SpeechLM
    from stages.artifacts import ArtifactModule, promote
    from stages.stage2 import SpeechlessStage

    root = tmp_path_factory.mktemp("synthesis")
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=Q, codebook_size=K)
    spec = ArtifactModule("models.rvq.ResidualVQ", {"dim": 16, "num_quantizers": Q, "codebook_size": K}, rvq.state_dict())
    promote(stage="stage1", modules={"quantizer": spec}, metrics={"val/cosine": 1.0}, artifacts_dir=root / "artifacts",
            info={"num_quantizers": Q, "codebook_size": K, "dim": 16})
    stage1 = root / "artifacts" / "stage1" / "current"
    lm_dir = save_gemma3_lm_debug(root / "lm", WORDS * 4, vocab_size=300, hidden_size=32)
    lm = SpeechLM(lm=str(lm_dir), tokenizer=str(lm_dir), num_levels=Q, codebook_size=K, output_form="all_levels")
    stage = SpeechlessStage(lm=lm, stage1_artifact=str(stage1), text_dropout=0.1)
    promote(stage="stage2", modules=stage.artifact_modules({}), metrics={"val/loss": 1.0},
            artifacts_dir=root / "artifacts", info=stage.artifact_info())
    with open(root / "instructions.jsonl", "w") as f:
        for i in range(N):
            words = " ".join(WORDS[(i + j) % 5] for j in range(1 + i % 3))
            f.write(json.dumps({"id": f"ins{i:03d}", "instruction": words, "response": WORDS[i % 5]}) + "\n")
    return {"root": root, "stage1": stage1, "stage2": root / "artifacts" / "stage2" / "current",
            "instructions": root / "instructions.jsonl"}


def _command(world: dict[str, Path], out: Path, devices: int) -> list[str]:
    return [
        sys.executable, "-m", "stages", "predict", "--config", str(CONFIG),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.logger", "false",
        "--model.init_args.artifact", str(world["stage2"]), "--model.init_args.stage1_artifact", str(world["stage1"]),
        "--model.init_args.lm", "null", "--model.init_args.gen_max_frames", "16",
        "--data", "datamodules.text.TextInstructionDataModule", "--data.init_args.path", str(world["instructions"]),
        "--data.init_args.batch_size", "2",
        "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(out),
        "--trainer.callbacks.prefix", "synthetic", "--trainer.callbacks.jsonl_name", "synthetic.jsonl",
        "--trainer.callbacks.max_samples", "2",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1")


def _run(world, out: Path, devices: int) -> str:
    cmd = _command(world, out, devices)
    proc = subprocess.Popen(cmd, cwd=world["root"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"hang: {' '.join(cmd)} did not finish in {TIMEOUT} s\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-5000:]}"
    return stdout


def _kill_mid_run(world, out: Path, devices: int) -> set[str]:
    """Run, SIGKILL the whole process group once a shard is finished; the ids the finished shards hold."""
    proc = subprocess.Popen(_command(world, out, devices), cwd=world["root"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not list(out.glob("*.manifest.json")):
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before writing a shard\n{proc.stderr.read()[-5000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no shard finished before the timeout")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = {i for m in out.glob("*.manifest.json") for i in json.loads(m.read_text())["ids"]}
    assert 0 < len(done) < N and not (out / "index.json").exists(), "the kill did not land mid-run"
    print(f"killed on {devices} rank(s) with {len(done)} of {N} ids in finished shards")
    return done


def _records(out: Path) -> dict[str, dict]:
    """The merged JSONL by id, after checking every id is there once, in the JSONL and in the shards."""
    records = jsonl_records(out / "synthetic.jsonl")
    expected = [f"ins{i:03d}" for i in range(N)]
    assert [r["id"] for r in records] == expected
    index = read_index(out)
    keys = [s["__key__"] for path in index.paths() for s in iter_tar_samples(path)]
    assert sorted(keys) == expected and index.samples == N
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("uninterrupted") / "synthetic"
    _run(world, out, devices=1)
    return _records(out)


def test_two_ranks_killed_then_rerun_write_each_id_once(world, uninterrupted, tmp_path):
    out = tmp_path / "synthetic"
    done = _kill_mid_run(world, out, devices=2)
    stdout = _run(world, out, devices=2)
    assert f"{len(done)} written, {N - len(done)} left" in stdout
    assert _records(out) == uninterrupted  # the same codes per id: 2 ranks with a restart vs 1 rank


def test_one_rank_killed_then_rerun_then_nothing_left_on_two(world, uninterrupted, tmp_path):
    out = tmp_path / "synthetic"
    done = _kill_mid_run(world, out, devices=1)
    stdout = _run(world, out, devices=1)
    assert f"{len(done)} written, {N - len(done)} left" in stdout
    assert _records(out) == uninterrupted
    # A rerun after a complete run does nothing, on 2 ranks too (both run no batch; rank 0 merges in setup).
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stdout = _run(world, out, devices=2)
    assert f"{N} written, 0 left" in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
