"""Stage-1 metrics: utilisation/perplexity from counts, and DDP results equal one process on all data."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MeanMetric

from stages.metrics import CodebookUsage


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 6, (3, 2, 9), generator=g)  # [B, Q, T], codes 0..5 of K = 8
    mask = torch.rand(3, 9, generator=g) > 0.3
    values = torch.rand(20, generator=g)
    return codes, mask, values


def test_utilisation_and_perplexity_from_counts():
    usage = CodebookUsage(num_quantizers=2, codebook_size=4)
    codes = torch.tensor([[[0, 0, 1, 3], [2, 2, 2, 2]]])  # level 0 uses 3 codes, level 1 one code
    mask = torch.tensor([[True, True, True, False]])  # the last frame is padding: code 3 not counted
    out = usage.update(codes, mask) or usage.compute()
    assert torch.allclose(out["utilisation"], torch.tensor([0.5, 0.25]))
    p = torch.tensor([2 / 3, 1 / 3])
    assert math.isclose(out["perplexity"][0].item(), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-5)
    assert math.isclose(out["perplexity"][1].item(), 1.0, rel_tol=1e-6)


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    usage, mean = CodebookUsage(num_quantizers=2, codebook_size=8), MeanMetric()
    codes, mask, values = _data(rank)
    usage.update(codes, mask)
    mean.update(values[: 10 + 5 * rank])  # unequal counts per rank
    out = usage.compute()
    queue.put((rank, out["utilisation"].tolist(), out["perplexity"].tolist(), float(mean.compute())))
    dist.destroy_process_group()


def test_ddp_metrics_equal_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    single_usage, single_mean = CodebookUsage(num_quantizers=2, codebook_size=8), MeanMetric()
    for rank in range(2):
        codes, mask, values = _data(rank)
        single_usage.update(codes, mask)
        single_mean.update(values[: 10 + 5 * rank])
    expected = single_usage.compute()
    for _, util, ppl, mean in results:
        assert torch.allclose(torch.tensor(util), expected["utilisation"])
        assert torch.allclose(torch.tensor(ppl), expected["perplexity"], atol=1e-5)
        assert math.isclose(mean, float(single_mean.compute()), rel_tol=1e-6)


# ---- the one transcript normaliser -------------------------------------------------------------


def test_one_normaliser_for_every_wer():
    from stages.metrics import chance_wer, normalize_transcript
    from stages.tasks import normalizer

    for code in ("en", "en-US", "en_GB", "eng", "English"):
        assert normalize_transcript("Colour, ten dollars!", code) == "color $10", code  # English: spellings, numbers
    assert normalize_transcript("  Ɛyɛ   dɛ!  ", "tw") == "ɛyɛ dɛ"  # basic: Twi letters kept, spaces collapsed
    # A text without a language: basic by default, English where the caller says so (stage 3, infer).
    assert normalize_transcript("Colour", None) == "colour"
    assert normalize_transcript("Colour", None, unknown="en") == "color"
    assert normalizer(None)("Colour") == "color" and normalizer("tw")("Colour") == "colour"
    with pytest.raises(ValueError, match="unknown"):
        normalize_transcript("x", None, unknown="fr")
    digits = "zero one two three four five six seven eight nine".split()
    assert chance_wer(digits) == pytest.approx(0.9)  # one word in ten is right by chance
