"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What every subprocess a test starts runs with: no model hub, no tokenizer thread pool, one thread.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.fixture(scope="session")
def offline_env() -> Callable[..., dict[str, str]]:
    """``offline_env(drop=(), **extra)``: the environment of a subprocess a test starts.

    This process's environment (read at the call, so ``monkeypatch.setenv`` shows) with
    :data:`OFFLINE_ENV` over it, then ``extra``; the variables named in ``drop`` are left out (e.g. a
    launcher's ``WORLD_SIZE`` for a test that starts its own ranks).
    """

    def make(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return {**env, **OFFLINE_ENV, **extra}

    return make


@pytest.fixture
def spawn_gloo(monkeypatch, free_port, tmp_path):
    """``spawn_gloo(worker, world)``: run ``worker(rank, port, out_dir)`` in ``world`` spawned processes
    (each joins a gloo group on ``port``; ``out_dir`` is the test's ``tmp_path``, returned); skips
    without gloo. The workers unpickle ``worker`` by its module's import name (``tests.models...``),
    which pytest's importlib mode does not put on ``sys.path``: spawn hands the repo root to them."""
    from pathlib import Path

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))

    def spawn(worker, world: int):
        mp.spawn(worker, args=(free_port, str(tmp_path)), nprocs=world, join=True)
        return tmp_path

    return spawn


@pytest.fixture(scope="session")
def run_command():
    """``run_command(cmd, cwd, timeout=s)``: a subprocess in a new session with the offline test
    environment (one thread), killed whole and failed on a timeout, failed with its output tails on a
    non-zero exit; returns its stdout."""
    return _run_command


def _run_command(cmd: list[str], cwd, *, timeout: int) -> str:
    import signal
    import subprocess

    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # every rank and worker, not just the first process
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}")
    return stdout
