"""DDP correctness of models.kmeans.KMeansUnits: 2 gloo ranks on different shards == 1 process on both.

Each rank fits on its own shard (different data, different padding): the k-means++ buffer fills over
several steps, then mini-batch updates and reassignments (one starved centroid: K = 10 for 8
clusters, reassignment every 150 frames) follow. Afterwards both ranks must hold bit-identical state,
and a single process that saw the two shards concatenated in rank order must hold the same counts
exactly (they are integers) and the same centroids to 1e-5: its per-centroid sums add the same
frames in another order (one sum vs the all-reduce of two partial sums), float32 rounding of terms
of size ~10, about 1e-6 each, the only possible difference once the assignments agree.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from models.kmeans import KMeansUnits

WORLD, STEPS = 2, 8
DIM, UNITS = 16, 10


def _make() -> KMeansUnits:
    return KMeansUnits(dim=DIM, codebook_size=UNITS, init_frames=200, reassign_every=150, seed=3)


CENTERS = torch.randn(8, DIM, generator=torch.Generator().manual_seed(42)) * 3


def _shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: 2 utterances of 40 frames around 8 centres; rank 0 pads its
    first one by 10 frames, rank 1 its second by 20 (padding filled with 1e4, which must never count)."""
    g = torch.Generator(device="cpu").manual_seed(7919 * (rank + 1) + step)
    labels = torch.randint(len(CENTERS), (2, 40), generator=g)
    frames = CENTERS[labels] + 0.1 * torch.randn(2, 40, DIM, generator=g)
    lengths = torch.tensor([30, 40]) if rank == 0 else torch.tensor([40, 20])
    mask = torch.arange(40)[None, :] < lengths[:, None]
    return frames.masked_fill(~mask[..., None], 1e4), mask


def _counting_reassignments(km: KMeansUnits) -> list[int]:
    calls: list[int] = []
    original = km._reassign

    def wrapped(frames):
        calls.append(int(km.frames_since_reassign))
        return original(frames)

    km._reassign = wrapped
    return calls


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        km = _make().train()
        calls = _counting_reassignments(km)
        initialized_at = None
        for step in range(STEPS):
            km(*_shard(rank, step))
            if initialized_at is None and bool(km.initialized):
                initialized_at = step
        torch.save({"state": km.state_dict(), "calls": calls, "initialized_at": initialized_at,
                    "generator": km.generator_state()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_matches_single_process_on_concatenated_data(spawn_gloo):
    out = spawn_gloo(_worker, WORLD)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]

    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert torch.equal(ranks[0]["generator"], ranks[1]["generator"])
    # 70 + 60 valid frames per step over both ranks: the 200-frame buffer fills at the second step.
    assert ranks[0]["initialized_at"] == 1
    assert len(ranks[0]["calls"]) >= 2, "the scenario must exercise reassignment"

    single = _make().train()
    calls = _counting_reassignments(single)
    for step in range(STEPS):
        shards = [_shard(r, step) for r in range(WORLD)]
        single(torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]))
    assert calls == ranks[0]["calls"]
    state = single.state_dict()
    assert torch.equal(state["counts"], ranks[0]["state"]["counts"])
    assert torch.equal(state["frames_since_reassign"], ranks[0]["state"]["frames_since_reassign"])
    torch.testing.assert_close(ranks[0]["state"]["centroids"], state["centroids"], atol=1e-5, rtol=0)
    assert torch.equal(single.generator_state(), ranks[0]["generator"])
