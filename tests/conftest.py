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
