"""DDP correctness of models.rvq.ResidualVQ: 2 gloo ranks on different shards == 1 process on both.

Each rank trains on its own shard (different data, different padding) with k-means init, EMA and
dead-code restarts. Afterwards both ranks must hold bit-identical state, equal (up to float
summation order) to a single process that saw the two shards concatenated in rank order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import distributed as dist_utils
from models.rvq import ResidualVQ

WORLD = 2
STEPS = 6
DIM, CODES, LEVELS = 16, 32, 2


def _make_rvq() -> ResidualVQ:
    # 8 clusters for 32 codes: many codes die, so restarts are exercised on every rank.
    return ResidualVQ(
        dim=DIM,
        num_quantizers=LEVELS,
        codebook_size=CODES,
        kmeans_init=True,
        kmeans_iters=4,
        kmeans_buffer_frames=64,
        dead_code_threshold=0.3,
        decay=0.9,
        seed=3,
    )


def _shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: ``x [2, 40, D]`` and a mask with rank-dependent padding."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    centers = torch.randn(8, DIM, generator=torch.Generator().manual_seed(42)) * 3
    x = centers[torch.randint(8, (2, 40), generator=g)] + 0.1 * torch.randn(2, 40, DIM, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[rank, 40 - 10 * (rank + 1) :] = False
    return torch.where(mask[..., None], x, torch.full_like(x, 1e4)), mask


def _counting_restarts(rvq: ResidualVQ) -> list[int]:
    calls: list[int] = []
    original = rvq._restart_codes

    def wrapped(level, dead, frames, count):
        calls.append(count)
        return original(level, dead, frames, count)

    rvq._restart_codes = wrapped
    return calls


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert dist_utils.is_dist() and dist_utils.world_size() == WORLD and dist_utils.rank() == rank
        rows = torch.full((rank + 1, 3), float(rank))  # 1 row on rank 0, 2 on rank 1
        gathered = dist_utils.all_gather_variable(rows)
        assert gathered.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]

        rvq = _make_rvq().train()
        restarts = _counting_restarts(rvq)
        for step in range(STEPS):
            x, mask = _shard(rank, step)
            rvq(x, mask)
        torch.save({"state": rvq.state_dict(), "restarts": restarts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_matches_single_process_on_concatenated_data(tmp_path, monkeypatch, free_port):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # Spawned ranks unpickle _worker by this module's import name (tests.models...), which pytest's
    # importlib mode does not put on sys.path; spawn hands sys.path to the children.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Every rank holds the same state, bit for bit.
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert ranks[0]["restarts"] == ranks[1]["restarts"]

    # One process seeing both shards (rank order) reaches the same state.
    single = _make_rvq().train()
    restarts = _counting_restarts(single)
    for step in range(STEPS):
        shards = [_shard(r, step) for r in range(WORLD)]
        single(torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]))
    assert restarts, "the scenario must exercise dead-code restarts"
    assert restarts == ranks[0]["restarts"]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-4, rtol=1e-5, msg=name)
