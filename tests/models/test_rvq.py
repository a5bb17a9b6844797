"""Invariants of models.rvq.ResidualVQ and models.vq_math on tiny synthetic data (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import vq_math
from models.rvq import ResidualVQ

torch.set_num_threads(1)

DIM = 16


def _centers(n: int, dim: int = DIM, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def _batch(
    centers: torch.Tensor, b: int = 4, t: int = 64, noise: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """``[b, t, D]`` frames from a mixture of well-separated Gaussians."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(centers.shape[0], (b, t), generator=g)
    return centers[pick] + noise * torch.randn(b, t, centers.shape[1], generator=g)


def _train(rvq: ResidualVQ, centers: torch.Tensor, steps: int, **batch_kw) -> None:
    rvq.train()
    for step in range(steps):
        rvq(_batch(centers, seed=step, **batch_kw))


def _rvq(**kw) -> ResidualVQ:
    args = dict(dim=DIM, num_quantizers=2, codebook_size=16, kmeans_buffer_frames=256, kmeans_iters=5)
    args.update(kw)
    return ResidualVQ(**args)


def test_training_on_clusters_reaches_high_cosine_and_utilisation():
    centers = _centers(32)
    rvq = _rvq()
    _train(rvq, centers, steps=25)
    rvq.eval()
    x = _batch(centers, seed=1000)
    out = rvq(x)
    cosine = F.cosine_similarity(out.quantized, x, dim=-1).mean()
    assert cosine > 0.9
    utilisation = (out.usage[0] > 0).float().mean()
    assert utilisation >= 0.9
    assert out.perplexity[0] > 8
    # The second level must reduce the error the first leaves.
    err1 = (rvq.decode(out.codes[:, :1]) - x).pow(2).mean()
    err2 = (out.quantized - x).pow(2).mean()
    assert err2 < err1


def test_decode_encode_is_exact_for_codebook_sums():
    rvq = _rvq(kmeans_init=False)
    g = torch.Generator().manual_seed(1)
    state = rvq.state_dict()
    # Coarse level far apart, fine level small: greedy residual search must recover both indices.
    state["codebooks"] = torch.stack(
        [torch.randn(16, DIM, generator=g) * 10, torch.randn(16, DIM, generator=g) * 0.1]
    )
    rvq.load_state_dict(state)  # also checks the cached ||C||^2 follows loaded codebooks
    i, j = torch.randint(16, (2, 3, 5), generator=g)
    x = rvq.codebooks[0][i] + rvq.codebooks[1][j]
    codes = rvq.encode(x)
    assert codes.shape == (3, 2, 5) and codes.dtype == torch.long
    assert torch.equal(codes[:, 0], i) and torch.equal(codes[:, 1], j)
    torch.testing.assert_close(rvq.decode(codes), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rvq.decode(codes[:, :1]), rvq.codebooks[0][i])
    assert torch.equal(rvq.encode(x, n_levels=1), codes[:, :1])
    rvq.eval()
    torch.testing.assert_close(rvq(x).quantized, rvq.decode(codes))


@pytest.mark.parametrize("training", [True, False])
def test_straight_through_gradient_is_ones(training):
    rvq = _rvq(kmeans_buffer_frames=16)
    rvq.train(training)
    if not training:
        _train(rvq, _centers(8), steps=1)
        rvq.eval()
    x = _batch(_centers(8)).requires_grad_(True)
    out = rvq(x)
    out.quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_commit_loss_gradient_matches_autograd_reference():
    rvq = _rvq(kmeans_init=False, num_quantizers=3).eval()  # eval: codebooks stay as used
    x = _batch(_centers(8)).requires_grad_(True)
    out = rvq(x)
    out.commit_loss.backward()
    ref_x = x.detach().clone().requires_grad_(True)
    partial, ref = 0.0, 0.0
    for level in range(3):
        partial = partial + rvq.codebooks[level][out.codes[:, level]].detach()
        ref = ref + (ref_x - partial).pow(2).mean()
    (0.25 * ref / 3).backward()
    torch.testing.assert_close(out.commit_loss.detach(), (0.25 * ref / 3).detach())
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_masked_frames_never_touch_codebooks_or_usage():
    centers = _centers(16)
    x = _batch(centers, b=3, t=40)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, 30:] = False
    mask[2, 10:] = False
    padded = torch.where(mask[..., None], x, torch.full_like(x, 1e6))
    n_valid = int(mask.sum())
    kw = dict(kmeans_buffer_frames=n_valid, dead_code_threshold=0.5)
    with_pad, reference = _rvq(**kw), _rvq(**kw)
    for step in range(3):
        out = with_pad(padded + step * 0.01, mask)
        reference(x[mask][None] + step * 0.01)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(with_pad.state_dict()[name], value, msg=name)
    assert torch.isfinite(with_pad.codebooks).all()
    assert torch.equal(out.usage.sum(-1), torch.full((2,), n_valid))
    assert (out.codes.transpose(1, 2)[~mask] == -1).all()
    assert (out.codes.transpose(1, 2)[mask] >= 0).all()
    assert (out.quantized[~mask] == 0).all()
    assert torch.isfinite(out.commit_loss)
    # Padding that is inf/nan and requires grad must not poison the loss or the gradient.
    with_pad.eval()
    bad = torch.where(mask[..., None], x, torch.full_like(x, float("inf"))).requires_grad_(True)
    out = with_pad(bad, mask)
    (out.quantized.sum() + out.commit_loss).backward()
    assert torch.isfinite(out.commit_loss) and torch.isfinite(bad.grad).all()
    assert (bad.grad[~mask] == 0).all()


def test_kmeans_init_waits_for_buffer_and_is_deterministic():
    centers = _centers(32)
    runs = []
    for seed in (0, 0, 1):
        rvq = _rvq(kmeans_buffer_frames=400, seed=seed, dead_code_threshold=0.0).train()
        rvq(_batch(centers, seed=0))  # 256 frames: not enough yet
        assert not bool(rvq.initialized)
        rvq(_batch(centers, seed=1))
        assert bool(rvq.initialized)
        runs.append(rvq.codebook_embeddings().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_kmeans_centroids_match_clusters():
    centers = _centers(8)
    x = _batch(centers, b=1, t=400)[0]
    cent, counts = vq_math.kmeans(x, 16, iters=10, generator=torch.Generator().manual_seed(0))
    assert counts.sum() == 400
    # Every true center has a centroid within the noise level.
    assert torch.cdist(centers, cent).min(dim=1).values.max() < 0.1


def test_dead_code_restart_revives_unused_code():
    rvq = _rvq(kmeans_init=False, dead_code_threshold=0.01, num_quantizers=1).train()
    x = _batch(_centers(16))
    with torch.no_grad():
        rvq.codebooks[0, 3] = 1e3  # never the nearest code
        rvq.embed_sum[0, 3] = 1e3 * 1e-6
        rvq.cluster_size[0, 3] = 1e-6
    rvq(x)
    frames = x.reshape(-1, DIM)
    assert torch.cdist(rvq.codebooks[0, 3][None], frames).min() < 1e-5
    assert rvq.cluster_size[0, 3] >= 0.01 * rvq.cluster_size[0].mean()
    assert torch.allclose(rvq._code_sqnorm(), vq_math.code_sqnorm(rvq.codebooks))
    # Revived code is used on the next batch.
    assert rvq.encode(x)[:, 0].eq(3).any()


def test_distances_are_fp32_and_codes_exact_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    # Large common offset + small differences: bf16 (8-bit mantissa) cannot resolve the distances.
    codebook = 50.0 + torch.randn(64, 32, generator=g) * 0.05
    x = 50.0 + torch.randn(500, 32, generator=g) * 0.05
    idx32, dist32 = vq_math.nearest_code(x, codebook)
    naive = (x.bfloat16() @ codebook.bfloat16().t()).float() * -2 + vq_math.code_sqnorm(codebook)
    assert (naive.argmin(-1) != idx32).any(), "test data must be hard enough for bf16 to fail"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, dist = vq_math.nearest_code(x, codebook)
        rvq = _rvq(kmeans_init=False, dim=32, codebook_size=64, num_quantizers=1)
        rvq.codebooks[0] = codebook
        codes = rvq.encode(x[None])
    assert dist.dtype == torch.float32
    assert torch.equal(idx, idx32)
    torch.testing.assert_close(dist, dist32)
    assert torch.equal(codes[0, 0], idx32)


def test_quantizer_dropout_makes_first_level_decode_well():
    centers = _centers(16)
    rvq = _rvq(num_quantizers=3, quantizer_dropout=1.0)
    seen = set()
    rvq.train()
    for step in range(20):
        out = rvq(_batch(centers, seed=step))
        seen.add(out.n_levels)
        assert (out.codes[:, out.n_levels :] == -1).all()
        assert (out.codes[:, : out.n_levels] >= 0).all()
    assert len(seen) > 1 and seen <= {1, 2, 3}
    x = _batch(centers, seed=999)
    first = rvq.decode(rvq.encode(x, n_levels=1))
    random_codes = torch.randint(16, (4, 1, 64), generator=torch.Generator().manual_seed(0))
    mse_first = (first - x).pow(2).mean()
    mse_random = (rvq.decode(random_codes) - x).pow(2).mean()
    assert mse_first < 0.1 * mse_random


def test_state_dict_round_trip_gives_identical_outputs():
    centers = _centers(16)
    rvq = _rvq(dead_code_threshold=0.0)
    _train(rvq, centers, steps=3)
    state = rvq.state_dict()
    assert {"codebooks", "embed_sum", "cluster_size", "initialized"} <= set(state)
    assert "_sqnorm" not in state
    clone = _rvq(dead_code_threshold=0.0)
    clone.load_state_dict(state)
    x = _batch(centers, seed=77)
    for module in (rvq, clone):
        module.eval()
    assert torch.equal(rvq(x).codes, clone(x).codes)
    assert torch.equal(rvq(x).quantized, clone(x).quantized)
    rvq.train(), clone.train()
    rvq(x), clone(x)  # the EMA continues from the same statistics
    assert torch.equal(rvq.codebooks, clone.codebooks)
    assert torch.equal(rvq.embed_sum, clone.embed_sum)


def test_grad_codebooks_learn_from_codebook_loss():
    centers = _centers(8)
    rvq = _rvq(
        learnable="grad", num_quantizers=1, codebook_size=8, kmeans_init=False, dead_code_threshold=0.0
    )
    assert isinstance(rvq.codebooks, torch.nn.Parameter)
    opt = torch.optim.Adam(rvq.parameters(), lr=0.2)
    losses = []
    for step in range(30):
        out = rvq(_batch(centers, seed=step))
        assert out.codebook_loss.requires_grad
        opt.zero_grad()
        out.codebook_loss.backward()
        opt.step()
        losses.append(out.codebook_loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_raise_clear_errors():
    rvq = _rvq()
    with pytest.raises(RuntimeError, match="initialisation"):
        rvq.encode(torch.zeros(1, 4, DIM))
    with pytest.raises(ValueError, match="shape"):
        rvq(torch.zeros(1, 4, DIM + 1))
    with pytest.raises(ValueError, match="mask"):
        rvq(torch.zeros(1, 4, DIM), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="codes must be"):
        rvq.decode(torch.full((1, 2, 3), 16))
    with pytest.raises(ValueError, match="levels"):
        rvq.decode(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="kmeans_buffer_frames"):
        _rvq(kmeans_buffer_frames=8)
    with pytest.raises(ValueError, match="learnable"):
        _rvq(learnable="adam")


def test_nearest_code_row_chunks_match_single_matmul(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(300, DIM, generator=g), torch.randn(40, DIM, generator=g)
    idx, dist = vq_math.nearest_code(x, codebook)
    monkeypatch.setattr(vq_math, "_MAX_SCORE_ELEMENTS", 40 * 7)  # 7-row chunks, ragged last one
    idx_c, dist_c = vq_math.nearest_code(x, codebook)
    assert torch.equal(idx, idx_c)
    torch.testing.assert_close(dist, dist_c)
    torch.testing.assert_close(dist, torch.cdist(x, codebook).min(-1).values.square(), atol=1e-4, rtol=1e-4)
