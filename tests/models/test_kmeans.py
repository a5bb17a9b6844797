"""models.kmeans.KMeansUnits: recovers clusters, Sculley's update, the quantizer contract, reassignment."""

from __future__ import annotations

import pytest
import torch

from models.kmeans import KMeansUnits, kmeans_plusplus, minibatch_update_
from models.quantizer import PAD_CODE, SemanticQuantizer

DIM, CLUSTERS = 16, 8
CENTERS = torch.randn(CLUSTERS, DIM, generator=torch.Generator().manual_seed(42)) * 4


def clustered(seed: int, b: int = 4, t: int = 50, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [b, t, D]`` around :data:`CENTERS` and the true cluster of every frame ``[b, t]``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLUSTERS, (b, t), generator=g)
    return CENTERS[labels] + noise * torch.randn(b, t, DIM, generator=g), labels


def fit(km: KMeansUnits, steps: int, start: int = 0) -> KMeansUnits:
    km.train()
    for step in range(start, start + steps):
        km(clustered(step)[0])
    return km.eval()


def test_recovers_the_clusters_up_to_permutation():
    km = fit(KMeansUnits(dim=DIM, codebook_size=CLUSTERS, init_frames=300, seed=1), steps=20)
    assert isinstance(km, SemanticQuantizer) and bool(km.initialized)
    # Every true centre has its own centroid, within the noise of the mean of ~1000 frames.
    dist = torch.cdist(CENTERS, km.centroids)
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(CLUSTERS))
    assert float(dist.min(1).values.max()) < 0.05
    # Purity on held-out frames: each unit is one cluster.
    x, labels = clustered(999)
    units = km.encode(x)[:, 0]
    assert torch.equal(units, match[labels])


def test_minibatch_step_equals_sculleys_per_frame_updates():
    """The batched step is exactly Sculley's per-frame updates with rate 1 / v (assignments fixed)."""
    g = torch.Generator().manual_seed(0)
    centroids, counts = torch.randn(5, 3, generator=g), torch.tensor([0.0, 3.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    frames = torch.randn(40, 3, generator=g)
    idx = torch.cdist(frames, centroids).argmin(1)
    seq_c, seq_v = centroids.clone().double(), counts.clone()
    for x, k in zip(frames.double(), idx.tolist(), strict=True):
        seq_v[k] += 1
        seq_c[k] += (x - seq_c[k]) / seq_v[k]
    sums = torch.zeros(5, 3).index_add_(0, idx, frames)
    batch_counts = torch.bincount(idx, minlength=5).float()
    minibatch_update_(centroids, counts, sums, batch_counts)
    assert torch.equal(counts, seq_v)
    torch.testing.assert_close(centroids.double(), seq_c, atol=1e-5, rtol=1e-5)


def test_encode_decode_contract_and_padding_never_moves_a_centroid():
    km = KMeansUnits(dim=DIM, codebook_size=CLUSTERS, init_frames=300, seed=1)
    with pytest.raises(RuntimeError, match="before the centroids were fitted"):
        km.encode(torch.zeros(1, 2, DIM))
    fit(km, steps=10)
    before = {k: v.clone() for k, v in km.state_dict().items()}
    x, _ = clustered(5)
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[1, 30:] = False
    padded = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    codes = km.encode(padded, mask)
    assert codes.shape == (4, 1, 50) and codes.dtype == torch.long
    assert (codes[1, 0, 30:] == PAD_CODE).all() and (codes[mask[:, None]] >= 0).all()
    decoded = km.decode(codes)
    assert decoded.shape == (4, 50, DIM)
    assert (decoded[1, 30:] == 0).all()
    assert torch.equal(decoded[0], km.centroids[codes[0, 0]])
    with pytest.raises(ValueError, match=r"codes must be in \[-1, 8\)"):
        km.decode(torch.full((1, 1, 2), CLUSTERS))
    # Eval-mode forward, encode and decode leave the state alone; a training step over NaN padding
    # moves the centroids by valid frames only.
    km(padded, mask)
    assert all(torch.equal(v, before[k]) for k, v in km.state_dict().items())
    km.train()(padded, mask)
    assert torch.isfinite(km.centroids).all()
    assert float(km.counts.sum() - before["counts"].sum()) == float(mask.sum())


def test_forward_under_bf16_autocast_assigns_like_fp32():
    km = fit(KMeansUnits(dim=DIM, codebook_size=CLUSTERS, init_frames=300, seed=1), steps=10)
    x, _ = clustered(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = km(x)
    assert torch.equal(out.codes, km.encode(x)) and out.sq_dist.dtype == torch.float32


def test_kmeans_plusplus_is_seeded_and_spreads_over_clusters():
    x = clustered(3, b=8)[0].reshape(-1, DIM)
    a = kmeans_plusplus(x, CLUSTERS, torch.Generator().manual_seed(0))
    b = kmeans_plusplus(x, CLUSTERS, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # One seed per true cluster (the greedy candidates make a doubled cluster vanishingly rare).
    assert sorted(torch.cdist(a, CENTERS).argmin(1).tolist()) == list(range(CLUSTERS))
    with pytest.raises(ValueError, match="at least 8 frames"):
        kmeans_plusplus(x[:7], CLUSTERS, torch.Generator())


def test_a_dead_centroid_is_reassigned_onto_the_data():
    """K = 9 for 8 clusters: after init one centroid is starved; reassignment moves it onto a frame."""
    km = KMeansUnits(dim=DIM, codebook_size=CLUSTERS + 1, init_frames=300, reassign_every=200, seed=1).train()
    fit(km, steps=4)
    far = torch.full((DIM,), 100.0)
    km.centroids[0] = far  # no frame is ever nearest: a dead unit
    km.counts[0] = 0.0
    fit(km, steps=3, start=10)
    assert not torch.equal(km.centroids[0], far)
    frame_dist = torch.cdist(km.centroids[:1], CENTERS).min()
    assert float(frame_dist) < 1.0  # now on (a frame of) one of the clusters
    assert float(km.counts[0]) > 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="init_frames"):
        KMeansUnits(dim=4, codebook_size=10, init_frames=9)
    with pytest.raises(ValueError, match="reassignment_ratio"):
        KMeansUnits(dim=4, codebook_size=2, init_frames=2, reassignment_ratio=1.0)
    km = KMeansUnits(dim=4, codebook_size=2, init_frames=2)
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        km(torch.zeros(1, 3, 5))
