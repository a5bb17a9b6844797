"""DDP tests of ``SpeechDataModule`` through a real ``lightning.Trainer`` on the CPU (gloo).

Shards of unequal length (7, 3 and 11 samples, varied durations): in ``exact`` mode every key is
trained on exactly once per epoch across ranks and all ranks run the same number of batches;
``resampled`` runs exactly ``epoch_batches`` per rank. Once with ``devices=2`` (Lightning's ``ddp``
launcher) and once as two single-device "nodes" on 127.0.0.1 started by hand. The runs happen in
``ddp_run.py`` subprocesses with timeouts, so a DDP hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ddp_run.py"
TIMEOUT = 240  # generous: the CI machine is shared; a hang still fails instead of blocking


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("pipeline_test_helpers", HERE / "test_pipeline.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    root = tmp_path_factory.mktemp("ddp_shards")
    return str(root), helpers.make_speech(root, counts=(7, 3, 11), seed=4)


# A launcher's variables must not leak into the ranks a test starts itself.
LAUNCHER = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(out: Path, mode: str, world: int) -> list[dict]:
    ranks = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(world)]
    assert [r["world_size"] for r in ranks] == [world] * world
    return ranks


def _assert_exact(ranks: list[dict], keys: list[str], epochs: int) -> None:
    for split in ("train", "val"):
        for epoch in range(epochs if split == "train" else 1):
            per_rank = [r["seen"][split][str(epoch)] for r in ranks]
            # Equal batch counts on every rank: DDP's all-reduce never waits on an exhausted rank.
            assert len({len(batches) for batches in per_rank}) == 1, (
                split,
                epoch,
                [len(b) for b in per_rank],
            )
            counted = Counter(k for batches in per_rank for batch in batches for k, w in batch if w > 0)
            assert counted == Counter(keys), (split, epoch)
            for batches in per_rank:
                for batch in batches:
                    # A padding batch is one real sample with weight 0.
                    assert all(w > 0 for _, w in batch) or (len(batch) == 1 and batch[0][1] == 0)
    orders = [
        [k for r in ranks for b in r["seen"]["train"][str(e)] for k, w in b if w > 0] for e in range(epochs)
    ]
    assert orders[0] != orders[1], "the epoch number did not reach the workers"


def test_trainer_ddp_two_devices_exact_and_resampled(shards, tmp_path, offline_env):
    root, keys = shards
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--shards",
        root,
        "--out",
        str(tmp_path),
        "--modes",
        "exact,resampled",
        "--epoch-batches",
        "5",
        "--devices",
        "2",
        "--num-workers",
        "1",
    ]
    proc = subprocess.run(
        cmd,
        env=offline_env(drop=LAUNCHER, PYTHONWARNINGS="ignore", MASTER_PORT=str(_free_port())),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_exact(_load(tmp_path, "exact", 2), keys, epochs=2)
    for rank in _load(tmp_path, "resampled", 2):
        assert [len(rank["seen"]["train"][str(e)]) for e in range(2)] == [5, 5]
        assert all(w == 1.0 for b in rank["seen"]["train"]["0"] for _, w in b)


def test_two_nodes_on_localhost_exact(shards, tmp_path, offline_env):
    root, keys = shards
    port = str(_free_port())
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--shards",
        root,
        "--out",
        str(tmp_path),
        "--modes",
        "exact",
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--num-workers",
        "0",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=offline_env(
                drop=LAUNCHER, PYTHONWARNINGS="ignore",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK=str(node), LOCAL_RANK="0",
            ),  # fmt: skip
        )
        for node in range(2)
    ]
    try:
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    _assert_exact(_load(tmp_path, "exact", 2), keys, epochs=2)
