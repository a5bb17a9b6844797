"""Codebook math for the residual vector quantizer: distances, EMA statistics, k-means, restarts.

Pure functions on tensors, split from the public module the way audiocraft splits
``core_vq.py`` (EuclideanCodebook: k-means init, EMA with Laplace smoothing, dead-code expiry) from
its quantizer. The EMA form is VQ-VAE-2's (Razavi et al., 2019, appendix A.1); the restart of dead
codes from batch frames is Jukebox's (Dhariwal et al., 2020).

Speed and exactness choices shared by every function here:

- Nearest codes come from one fused ``addmm`` per level: ``||C||^2 - 2 x C^T`` (``||x||^2`` is
  constant per row, so it is added to the winning score only), then one ``min`` over codes. No
  ``cdist``, no ``[N, K, D]`` tensor.
- Distances are computed in fp32 with autocast disabled: in bf16 the ``-2 x C^T`` term has ~3
  significant digits and the argmin picks wrong codes.
- Statistics use ``index_add_`` (one pass over the frames), not a one-hot ``[N, K]`` matmul, which
  costs as much as the distance matmul itself.
- Everything that must agree across ranks (k-means, restart frames) draws its randomness from a
  generator every rank advances identically, over data that is identical on every rank.
"""

from __future__ import annotations

import torch

from models import distributed as dist_utils

__all__ = [
    "accumulate_code_stats_",
    "code_sqnorm",
    "dead_code_mask",
    "ema_update_",
    "kmeans",
    "nearest_code",
    "sample_global_rows",
    "smoothed_codebook",
]

# Row chunk for distance matrices: bounds the [rows, K] fp32 score matrix to ~256 MiB.
_MAX_SCORE_ELEMENTS = 1 << 26


def code_sqnorm(codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every code, in fp32.

    Args:
        codebook: ``[..., K, D]``.

    Returns:
        ``[..., K]`` fp32.
    """
    with torch.autocast(device_type=codebook.device.type, enabled=False):
        return torch.linalg.vector_norm(codebook.float(), dim=-1).square()


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, sqnorm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code (squared Euclidean) for every row, computed in fp32.

    Args:
        x: ``[N, D]`` frames, any float dtype (upcast to fp32).
        codebook: ``[K, D]``.
        sqnorm: ``[K]`` cached ``||C||^2`` (fp32); computed when omitted.

    Returns:
        ``(idx, dist)``: ``idx [N]`` long, ``dist [N]`` fp32 squared distance to the chosen code
        (always fp32, even under autocast).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        codebook = codebook.float()
        sqnorm = code_sqnorm(codebook) if sqnorm is None else sqnorm.float()
        rows = max(1, _MAX_SCORE_ELEMENTS // max(1, codebook.shape[0]))
        if x.shape[0] <= rows:
            best, idx = torch.addmm(sqnorm, x, codebook.t(), alpha=-2.0).min(dim=-1)
        else:
            parts = [torch.addmm(sqnorm, c, codebook.t(), alpha=-2.0).min(dim=-1) for c in x.split(rows)]
            best = torch.cat([p[0] for p in parts])
            idx = torch.cat([p[1] for p in parts])
        return idx, best + torch.linalg.vector_norm(x, dim=-1).square()


def accumulate_code_stats_(
    out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, valid: torch.Tensor
) -> None:
    """Add per-code frame sums and counts of the valid frames into ``out`` (in place).

    Invalid frames are routed to a scratch row ``K`` that is dropped, so inf/nan padding cannot
    leak into real codes. On the CPU the sum is a sparse ``[K+1, N] x [N, D]`` product:
    ``index_add_`` there costs about as much as the distance matmul, the sparse product ~1/5 of it.

    Args:
        out: ``[K, D + 1]`` fp32 accumulator: columns ``:D`` are frame sums, column ``D`` counts.
        idx: ``[N]`` long code of every frame.
        x: ``[N, D]`` frames.
        valid: ``[N]`` bool.
    """
    k = out.shape[0]
    rows = torch.where(valid, idx, k)
    out[:, -1] += torch.bincount(rows, minlength=k + 1)[:k].to(out.dtype)
    x = x.to(out.dtype)
    if x.device.type == "cpu":
        n = x.shape[0]
        onehot = torch.sparse_coo_tensor(
            torch.stack([rows, torch.arange(n, device=x.device)]),
            torch.ones(n, dtype=x.dtype, device=x.device),
            (k + 1, n),
            is_coalesced=False,
            check_invariants=False,
        )
        out[:, :-1] += torch.sparse.mm(onehot, x)[:k]
    else:
        sums = x.new_zeros((k + 1, x.shape[1])).index_add_(0, rows, x)
        out[:, :-1] += sums[:k]


def ema_update_(
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
) -> None:
    """One EMA step of the codebook statistics, in place: ``s <- decay * s + (1 - decay) * batch``.

    Args:
        cluster_size: ``[..., K]`` EMA of code counts.
        embed_sum: ``[..., K, D]`` EMA of per-code frame sums.
        counts: ``[..., K]`` this step's counts (already summed over ranks).
        sums: ``[..., K, D]`` this step's sums (already summed over ranks).
        decay: EMA decay in ``[0, 1)``.
    """
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_sum.lerp_(sums.to(embed_sum.dtype), 1.0 - decay)


def smoothed_codebook(cluster_size: torch.Tensor, embed_sum: torch.Tensor, eps: float) -> torch.Tensor:
    """Codebook from EMA statistics with Laplace smoothing (no division by a zero count).

    Args:
        cluster_size: ``[..., K]``.
        embed_sum: ``[..., K, D]``.
        eps: additive smoothing per code.

    Returns:
        ``[..., K, D]``: ``embed_sum / ((c + eps) / (n + K eps) * n)`` with ``n = sum_k c``.
    """
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + cluster_size.shape[-1] * eps) * n
    return embed_sum / smoothed.unsqueeze(-1)


def dead_code_mask(cluster_size: torch.Tensor, threshold: float) -> torch.Tensor:
    """Codes whose EMA usage fell below ``threshold`` times the average usage of their codebook.

    Args:
        cluster_size: ``[..., K]``.
        threshold: relative to the mean over ``K`` (0.01 = below 1 % of an average code).

    Returns:
        ``[..., K]`` bool.
    """
    return cluster_size < threshold * cluster_size.mean(-1, keepdim=True)


def sample_global_rows(local: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sample ``n`` rows from the concatenation of every rank's ``local`` rows, identically everywhere.

    The indices are drawn on the CPU from ``generator`` over the global row count, each rank fills
    the rows it owns and a sum over ranks completes them. So the result is the same on every rank
    and bit-equal to a single process sampling from the ranks' rows concatenated in rank order.
    Without replacement when there are enough rows.

    Args:
        local: ``[N_r, D]`` this rank's candidate rows (``N_r`` may differ per rank).
        n: number of rows wanted; must be the same on every rank.
        generator: CPU generator in the same state on every rank.

    Returns:
        ``[n, D]`` fp32, or ``[0, D]`` when no rank has rows.
    """
    counts = dist_utils.all_gather_variable(torch.tensor([local.shape[0]], device=local.device)).cpu()
    total = int(counts.sum())
    if total == 0 or n == 0:
        return local.new_zeros((0, local.shape[1]), dtype=torch.float32)
    if n <= total:
        picks = torch.randperm(total, generator=generator)[:n]
    else:
        picks = torch.randint(total, (n,), generator=generator)
    offset = int(counts[: dist_utils.rank()].sum())
    mine = (picks >= offset) & (picks < offset + local.shape[0])
    out = local.new_zeros((n, local.shape[1]), dtype=torch.float32)
    rows = mine.nonzero().squeeze(1)
    out[rows.to(local.device)] = local[(picks[rows] - offset).to(local.device)].float()
    return dist_utils.all_reduce_sum(out)


@torch.no_grad()
def kmeans(
    x: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in fp32, seeded by distinct random rows; deterministic given ``generator``.

    Empty clusters keep their previous centroid (the dead-code restart deals with them later).

    Args:
        x: ``[M, D]`` frames, ``M >= num_codes``.
        num_codes: ``K``.
        iters: Lloyd iterations (0 returns the seeding rows).
        generator: CPU generator.

    Returns:
        ``(centroids [K, D] fp32, counts [K] fp32)``: counts are the last assignment's cluster sizes.

    Raises:
        ValueError: fewer frames than codes.
    """
    if x.shape[0] < num_codes:
        raise ValueError(f"k-means needs at least {num_codes} frames, got {x.shape[0]}")
    x = x.float()
    seeds = torch.randperm(x.shape[0], generator=generator)[:num_codes].to(x.device)
    centroids = x[seeds].clone()
    counts = torch.zeros(num_codes, device=x.device)
    for _ in range(max(iters, 1)):
        idx, _ = nearest_code(x, centroids)
        stats = x.new_zeros((num_codes, x.shape[1] + 1))
        accumulate_code_stats_(stats, idx, x, torch.ones_like(idx, dtype=torch.bool))
        counts = stats[:, -1]
        if iters == 0:
            break
        filled = counts > 0
        centroids = torch.where(filled[:, None], stats[:, :-1] / counts.clamp_min(1)[:, None], centroids)
    return centroids, counts
