"""Stage-2 word match under DDP: 2 gloo ranks score the same texts, and the figure one process would.

Each rank sees different utterances (as a distributed validation does) and keeps only its
``max_texts`` smallest texts; after :meth:`WordMatchItems.gather` both ranks hold the items of the
``max_texts`` smallest texts overall, from every rank, so they log one figure.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.metrics import WordMatchItems, word_match

WORLD = 2
# rank -> the texts of its utterances, in the order it validates them
SEEN = {0: ["f", "c", "a", "e", "c"], 1: ["d", "c", "b", "b"]}


def _item(rank: int, i: int, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + i)
    base = torch.full((4, 3), float(ord(text)))  # each text its own direction around the mean
    base[:, ord(text) % 3] += 50
    return base + torch.randn(4, 3, generator=g), base[:1].repeat(5, 1) + torch.randn(5, 3, generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        items = WordMatchItems(max_texts=3)
        for i, text in enumerate(SEEN[rank]):
            items.add(text, *_item(rank, i, text))
        gathered = items.gather()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump((gathered, word_match(gathered)), f)
    finally:
        dist.destroy_process_group()


def test_keeps_the_smallest_texts_while_the_epoch_runs():
    items = WordMatchItems(max_texts=2)
    for text in ["d", "b", "c", "a", "b"]:
        items.add(text, torch.zeros(1, 2), torch.zeros(1, 2))
    assert sorted(items.by_text) == ["a", "b"] and len(items.by_text["b"]) == 2
    assert [t for t, _, _ in items.gather()] == ["a", "b", "b"]  # no process group: this rank's own
    with pytest.raises(ValueError):
        WordMatchItems(max_texts=1)


@pytest.mark.timeout(120)
def test_two_ranks_score_the_same_items_as_one_process(tmp_path, monkeypatch, free_port):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawn re-imports this module
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]

    # What one process holding every utterance would score: the 3 smallest texts, all their items.
    expected = [(t, *_item(r, i, t)) for r in range(WORLD) for i, t in enumerate(SEEN[r]) if t in "abc"]
    expected.sort(key=lambda x: x[0])  # stable: rank order within a text, as gather() gives
    for gathered, score in results:
        assert [t for t, _, _ in gathered] == ["a", "b", "b", "c", "c", "c"]
        for (t, g, r), (te, ge, re) in zip(gathered, expected, strict=True):
            assert t == te and torch.equal(g, ge) and torch.equal(r, re)
        assert score == word_match(expected) and score[1] == 3
    assert results[0][1] == results[1][1]
