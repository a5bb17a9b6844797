"""SpireLM's k-means units: one codebook of ``K`` centroids over frozen encoder states, fitted at scale.

SpireLM (Ambilduke et al., 2025) clusters HuBERT Large layer-22 features into 5000 units with
k-means (the GSLM / textless-lib recipe, which fits scikit-learn's ``MiniBatchKMeans``). Here the
same fit runs in torch over streamed batches of encoder states, on any device and under DDP:

- **Initialisation**: greedy k-means++ (Arthur & Vassilvitskii, 2007; ``2 + ln K`` candidates per
  centre, as scikit-learn's ``_kmeans_plusplus``) on the first ``init_frames`` valid frames. Each
  training step gathers its frames from every rank (in rank order), so every rank holds the same
  buffer, runs the same k-means++ with the same generator, and rank 0's centroids are broadcast
  anyway. The buffer is then applied as the first mini-batch, so each frame counts once.
- **Updates**: mini-batch k-means (Sculley, "Web-scale k-means clustering", WWW 2010) with
  per-centroid learning rates ``1 / v_k``, ``v_k`` the frames centroid ``k`` has absorbed so far.
  A batch's frames are assigned with the current centroids, then centroid ``k`` with ``n_k`` of them
  (sum ``s_k``) moves to ``(v_k c_k + s_k) / (v_k + n_k)``: exactly Sculley's per-frame updates of
  one batch. The counts ``n_k`` and sums ``s_k`` are all-reduced, so after every step each rank holds
  the centroids one process would hold after seeing all ranks' frames (up to float summation order).
- **Empty and dead centroids**: a centroid no frame of a batch chose keeps its place. Every
  ``reassign_every`` frames (summed over ranks; default ``10 K``, scikit-learn's period), and at
  every step while some centroid has absorbed no frame at all, the
  centroids whose count is below ``reassignment_ratio`` times the largest count are moved onto
  frames of the batch drawn over all ranks with the shared generator (at most half the batch, the
  least used first) and given the smallest count of the others, as scikit-learn does.

``encode`` gives each valid frame its nearest centroid (squared Euclidean, in fp32), ``-1`` on
padding; ``decode`` maps units back to their centroids (``-1`` to zeros). Counts are float64: at
50 frames/s a centroid of a 1000-hour corpus absorbs more frames than float32 counts exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models import distributed as dist_utils
from models import vq_math
from models.quantizer import PAD_CODE, SemanticQuantizer

__all__ = ["KMeansOutput", "KMeansUnits", "kmeans_plusplus", "minibatch_update_"]


@dataclass
class KMeansOutput:
    """What :meth:`KMeansUnits.forward` returns.

    Attributes:
        codes: ``[B, 1, T]`` long units, ``-1`` on padded frames (from the centroids before this
            step's update; all 0 while training steps are still filling the init buffer).
        sq_dist: ``[B, T]`` fp32 squared distance of each frame to its centroid, 0 on padding.
        usage: ``[K]`` long, how often each unit was chosen in this rank's batch.
    """

    codes: torch.Tensor
    sq_dist: torch.Tensor
    usage: torch.Tensor


def _sq_dists(points: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """``[P, N]`` squared distances from ``points [P, D]`` to ``x [N, D]`` (``x_sq [N]`` = ``||x||^2``)."""
    p_sq = points.square().sum(-1, keepdim=True)
    return torch.addmm(p_sq + x_sq[None], points, x.t(), alpha=-2.0).clamp_min_(0.0)


@torch.no_grad()
def kmeans_plusplus(x: torch.Tensor, num_codes: int, generator: torch.Generator, n_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding, deterministic given ``generator``.

    Each new centre is the best (lowest total potential) of ``n_trials`` candidates drawn with
    probability proportional to the squared distance to the nearest centre so far.

    Args:
        x: ``[M, D]`` frames, ``M >= num_codes``.
        num_codes: ``K``.
        generator: CPU generator (the draws are made on the CPU, the distances on ``x``'s device).
        n_trials: candidates per centre; default ``2 + int(ln K)``.

    Returns:
        ``[K, D]`` fp32 centres, rows of ``x``.
    """
    m = x.shape[0]
    if m < num_codes:
        raise ValueError(f"k-means++ needs at least {num_codes} frames, got {m}")
    trials = n_trials or 2 + int(math.log(num_codes))
    x = x.float()
    x_sq = x.square().sum(-1)
    chosen = torch.empty(num_codes, dtype=torch.long)
    chosen[0] = int(torch.randint(m, (), generator=generator))
    closest = _sq_dists(x[chosen[:1].to(x.device)], x, x_sq)[0]  # [M]
    for c in range(1, num_codes):
        cumulative = closest.double().cumsum(0)
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_max_(m - 1)
        with_candidate = torch.minimum(closest[None], _sq_dists(x[candidates], x, x_sq))  # [trials, M]
        best = int(with_candidate.double().sum(-1).argmin())
        closest = with_candidate[best]
        chosen[c] = int(candidates[best])
    return x[chosen.to(x.device)].clone()


def minibatch_update_(centroids: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, batch_counts: torch.Tensor) -> None:
    """Sculley's per-centroid-rate step, in place: ``c_k <- c_k + (s_k - n_k c_k) / (v_k + n_k)``.

    Args:
        centroids: ``[K, D]`` fp32.
        counts: ``[K]`` float64 ``v_k``, frames absorbed so far (incremented by ``n_k``).
        sums: ``[K, D]`` this step's per-centroid frame sums (over every rank).
        batch_counts: ``[K]`` this step's per-centroid frame counts ``n_k`` (over every rank).
    """
    counts += batch_counts.to(counts.dtype)
    rate = (1.0 / counts.clamp_min(1.0)).to(centroids.dtype)  # 1 / (v_k + n_k); n_k = 0 moves nothing
    centroids += (sums - batch_counts.to(centroids.dtype)[:, None] * centroids) * rate[:, None]


class KMeansUnits(SemanticQuantizer):
    """``K`` k-means centroids over ``D``-dim encoder states: one level of units (``Q = 1``).

    Trains in training mode only (``forward``): see the module docstring for initialisation,
    mini-batch updates and dead-centroid reassignment. ``encode`` and ``decode`` never update.

    Args:
        dim: frame size ``D``.
        codebook_size: units ``K``.
        init_frames: valid frames (summed over ranks) gathered for k-means++; at least ``K``.
        reassignment_ratio: a centroid whose count is below this fraction of the largest count is
            moved onto a batch frame at the next reassignment; 0 disables it (scikit-learn: 0.01).
        reassign_every: frames (over all ranks) between reassignments; default ``10 K``.
        seed: seeds the generator behind k-means++ and reassignment (identical on every rank).
    """

    num_quantizers = 1

    def __init__(
        self,
        *,
        dim: int = 1024,
        codebook_size: int = 5000,
        init_frames: int = 65536,
        reassignment_ratio: float = 0.01,
        reassign_every: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(dim, codebook_size) < 1:
            raise ValueError("dim and codebook_size must be positive")
        if init_frames < codebook_size:
            raise ValueError(f"init_frames ({init_frames}) must be >= codebook_size ({codebook_size})")
        if not 0.0 <= reassignment_ratio < 1.0:
            raise ValueError(f"reassignment_ratio must be in [0, 1), got {reassignment_ratio}")
        self.dim, self.codebook_size, self.init_frames = dim, codebook_size, init_frames
        self.reassignment_ratio, self.seed = reassignment_ratio, seed
        self.reassign_every = reassign_every if reassign_every is not None else 10 * codebook_size
        if self.reassign_every < 1:
            raise ValueError(f"reassign_every must be >= 1, got {reassign_every}")
        self._generator = torch.Generator().manual_seed(seed)
        self._buffer: list[torch.Tensor] = []  # every rank's frames, identical on every rank
        self.register_buffer("centroids", torch.zeros(codebook_size, dim))
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frames_since_reassign", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ public API

    def generator_state(self) -> torch.Tensor:
        """State of the generator behind k-means++ and reassignment (for training checkpoints)."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`generator_state` (every rank restores the same state)."""
        self._generator.set_state(state.detach().cpu().to(torch.uint8))

    def init_buffer(self) -> list[torch.Tensor]:
        """Frames gathered for k-means++ so far (every rank's, the same on every rank)."""
        return [b.detach().cpu() for b in self._buffer]

    def set_init_buffer(self, frames: list[torch.Tensor]) -> None:
        """Restore :meth:`init_buffer` on every rank (a run resumed before k-means++ ran)."""
        self._buffer = [f.to(device=self.centroids.device, dtype=torch.float32) for f in frames]

    def codebook_embeddings(self) -> torch.Tensor:
        """The centroids, detached: ``[1, K, D]`` (one level, like ``ResidualVQ``'s ``[Q, K, D]``)."""
        return self.centroids.detach()[None]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-centroid units of ``x``; never updates the centroids.

        Args:
            x: ``[B, T, D]`` frames.
            mask: ``[B, T]`` bool, True on valid frames; None means all valid.

        Returns:
            ``[B, 1, T]`` long, ``-1`` on padded frames.

        Raises:
            RuntimeError: the centroids were never fitted (nor loaded).
        """
        if not bool(self.initialized):
            raise RuntimeError("KMeansUnits.encode before the centroids were fitted: train or load weights first")
        flat, valid = self._flatten(x, mask)
        idx, _ = vq_math.nearest_code(flat, self.centroids)
        return torch.where(valid, idx, PAD_CODE).view(*x.shape[:2])[:, None]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Centroids of ``codes [B, 1, T]`` (``-1`` gives zeros): ``[B, T, D]``."""
        if codes.dim() != 3 or codes.shape[1] != 1:
            raise ValueError(f"expected codes of shape [B, 1, T], got {tuple(codes.shape)}")
        if bool(((codes < PAD_CODE) | (codes >= self.codebook_size)).any()):
            raise ValueError(f"codes must be in [-1, {self.codebook_size})")
        rows = codes[:, 0]
        out = self.centroids[rows.clamp_min(0)]
        return out * (rows != PAD_CODE)[..., None].to(out.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> KMeansOutput:
        """Assign ``x`` to its nearest centroids; in training mode also fit (init, update, reassign).

        Args:
            x: ``[B, T, D]`` frames (any float dtype; the math runs in fp32, also under autocast).
            mask: ``[B, T]`` bool, True on valid frames; None means all valid.

        Returns:
            :class:`KMeansOutput` (codes from the centroids before this step's update).
        """
        flat, valid = self._flatten(x, mask)
        with torch.no_grad(), torch.autocast(device_type=flat.device.type, enabled=False):
            frames = flat.detach().float()
            idx, dist = vq_math.nearest_code(frames, self.centroids)
            if self.training:
                if bool(self.initialized):
                    self._step(frames, idx, valid)
                else:
                    self._collect(frames[valid])
            codes = torch.where(valid, idx, PAD_CODE)
            sq_dist = torch.where(valid, dist, torch.zeros_like(dist))
            usage = torch.bincount(torch.where(valid, idx, self.codebook_size), minlength=self.codebook_size + 1)
        b, t = x.shape[:2]
        return KMeansOutput(codes=codes.view(b, 1, t), sq_dist=sq_dist.view(b, t), usage=usage[:-1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, init_frames={self.init_frames}"

    # ------------------------------------------------------------------ internals

    def _flatten(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        if mask is None:
            return x.reshape(-1, self.dim), torch.ones(x.shape[0] * x.shape[1], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match x {tuple(x.shape[:2])}")
        return x.reshape(-1, self.dim), mask.reshape(-1).bool()

    def _collect(self, frames: torch.Tensor) -> None:
        """Add every rank's valid frames of this step (rank order) to the buffer; initialise when full."""
        self._buffer.append(dist_utils.all_gather_variable(frames))
        if sum(b.shape[0] for b in self._buffer) < self.init_frames:
            return
        buffer = torch.cat(self._buffer)
        self._buffer = []
        centroids = kmeans_plusplus(buffer, self.codebook_size, self._generator)
        self.centroids.copy_(dist_utils.broadcast(centroids))
        self.counts.zero_()
        self.initialized.fill_(True)
        # The buffer is the first mini-batch (it is on every rank already: no all-reduce).
        idx, _ = vq_math.nearest_code(buffer, self.centroids)
        self._absorb(buffer, idx, torch.ones_like(idx, dtype=torch.bool), reduce=False)

    def _step(self, frames: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> None:
        self._absorb(frames, idx, valid, reduce=True)
        # One host sync; identical on every rank (the counts were all-reduced).
        due = int(self.frames_since_reassign) >= self.reassign_every or bool((self.counts == 0).any())
        if self.reassignment_ratio > 0 and due:
            self.frames_since_reassign.zero_()
            self._reassign(frames[valid])

    def _absorb(self, frames: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, *, reduce: bool) -> None:
        stats = frames.new_zeros((self.codebook_size, self.dim + 1))
        vq_math.accumulate_code_stats_(stats, idx, frames, valid)
        if reduce:
            dist_utils.all_reduce_sum(stats)
        minibatch_update_(self.centroids, self.counts, stats[:, :-1], stats[:, -1])
        self.frames_since_reassign += int(stats[:, -1].sum())

    def _reassign(self, frames: torch.Tensor) -> None:
        """Move the rarely used centroids onto this step's frames, drawn over all ranks."""
        low = self.counts < self.reassignment_ratio * self.counts.max()
        n_low = int(low.sum())
        total = int(dist_utils.all_reduce_sum(torch.tensor([frames.shape[0]], device=frames.device))[0])
        if n_low == 0 or n_low == self.codebook_size or total == 0:
            return
        if n_low > total // 2:  # as scikit-learn: at most half the batch, the least used first
            low = torch.zeros_like(low)
            low[self.counts.argsort(stable=True)[: max(1, total // 2)]] = True
            n_low = int(low.sum())
        rows = vq_math.sample_global_rows(frames, n_low, self._generator)
        keep_min = self.counts[~low].min()
        self.centroids[low] = rows.to(self.centroids.dtype)
        self.counts[low] = keep_min
