"""Residual vector quantizer: stage 1's semantic tokenizer over frozen speech-encoder states.

Follows the Speechless recipe (Dao et al., INTERSPEECH 2025, arXiv:2505.17417: 8 codebooks x 2048
codes over 1024-dim Gemma 4 audio states) with the residual quantizer of SoundStream (Zeghidour et
al., 2021: residual levels, quantizer dropout) in audiocraft's form (k-means init, EMA codebooks,
dead-code restart). The codebook math lives in :mod:`models.vq_math`, the collectives in
:mod:`models.distributed`; this module is the public face: ``forward``, ``encode``, ``decode`` and
``codebook_embeddings``.

Under DDP every rank ends each training step with the same codebooks, equal to what one process
would hold after seeing all ranks' frames: EMA counts and sums are summed over ranks, k-means runs on
the frames gathered from every rank (then rank 0's result is broadcast), and dead codes are refilled
from frames drawn over all ranks with a generator every rank advances identically.

Codes of padded frames (``mask`` False), and of levels skipped by quantizer dropout, are ``-1``;
``decode`` maps ``-1`` to a zero vector, so ``decode(encode(x, mask))`` is zero on padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models import distributed as dist_utils
from models import vq_math
from models.quantizer import PAD_CODE, SemanticQuantizer

__all__ = ["RVQOutput", "ResidualVQ"]


@dataclass
class RVQOutput:
    """What :meth:`ResidualVQ.forward` returns.

    Attributes:
        quantized: ``[B, T, D]`` straight-through output ``x + (q - x).detach()`` (gradient to ``x``
            is the identity); zero on padded frames.
        codes: ``[B, Q, T]`` long; ``-1`` on padded frames and on levels dropped this step.
        commit_loss: scalar, ``commitment_weight`` times the mean over used levels of the masked
            per-element MSE between each level's residual input and its code (gradient to ``x``).
        codebook_loss: scalar, the same MSE with the gradient to the codebooks (``learnable="grad"``);
            zero with EMA codebooks.
        usage: ``[Q, K]`` long, how often each code was chosen in this rank's batch (valid frames).
        perplexity: ``[Q]`` ``exp(entropy)`` of each level's code distribution in this batch.
        n_levels: levels used this step (``Q`` unless quantizer dropout drew fewer).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor
    n_levels: int

    @property
    def loss(self) -> torch.Tensor:
        """Scalar: the quantizer's own loss terms, ``commit_loss + codebook_loss``."""
        return self.commit_loss + self.codebook_loss


class ResidualVQ(SemanticQuantizer):
    """``Q`` levels of ``K``-code Euclidean codebooks, each quantizing the residual of the previous.

    Commitment weight: 0.25, VQ-VAE's value (van den Oord et al., 2017), which SoundStream and
    audiocraft keep for EMA codebooks. The EMA (not the loss) moves the codebooks, so the term only
    keeps a trainable upstream from drifting away from them; over a frozen encoder it has no
    gradient to act on and is reported as a metric.

    Codebooks are updated only in training mode; padded frames never touch them. Until k-means has
    run (after ``kmeans_buffer_frames`` valid frames over all ranks) training steps only collect
    frames, and the outputs come from the placeholder (zero) codebooks.

    Args:
        dim: frame size ``D``.
        num_quantizers: levels ``Q``.
        codebook_size: codes per level ``K``.
        decay: EMA decay of code counts and sums (also of the usage used for dead codes).
        learnable: ``"ema"`` (codebooks are EMA buffers) or ``"grad"`` (codebooks are a parameter,
            trained through ``codebook_loss``).
        commitment_weight: beta, see above.
        kmeans_init: initialise by k-means on real frames; otherwise from a seeded normal.
        kmeans_iters: Lloyd iterations per level.
        kmeans_buffer_frames: valid frames (summed over ranks) to collect before k-means; at least
            ``codebook_size``.
        dead_code_threshold: a code whose EMA usage drops below this fraction of the level's average
            usage is refilled with a frame from the batch; ``0`` disables restarts.
        quantizer_dropout: probability that a training step uses only the first ``n`` levels, with
            ``n`` uniform in ``[1, Q]`` (the same on every rank).
        eps: Laplace smoothing of the EMA counts.
        seed: seeds the generator behind k-means, restarts and dropout (identical on every rank).
    """

    def __init__(
        self,
        *,
        dim: int = 1024,
        num_quantizers: int = 8,
        codebook_size: int = 2048,
        decay: float = 0.99,
        learnable: Literal["ema", "grad"] = "ema",
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        kmeans_buffer_frames: int = 32768,
        dead_code_threshold: float = 0.01,
        quantizer_dropout: float = 0.0,
        eps: float = 1e-5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if learnable not in ("ema", "grad"):
            raise ValueError(f"learnable must be 'ema' or 'grad', got {learnable!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        if min(dim, num_quantizers, codebook_size) < 1:
            raise ValueError("dim, num_quantizers and codebook_size must be positive")
        if kmeans_init and kmeans_buffer_frames < codebook_size:
            raise ValueError(
                f"kmeans_buffer_frames ({kmeans_buffer_frames}) must be >= codebook_size ({codebook_size})"
            )
        self.dim, self.num_quantizers, self.codebook_size = dim, num_quantizers, codebook_size
        self.decay, self.learnable, self.commitment_weight = decay, learnable, commitment_weight
        self.kmeans_iters, self.kmeans_buffer_frames = kmeans_iters, kmeans_buffer_frames
        self.dead_code_threshold, self.quantizer_dropout, self.eps = (
            dead_code_threshold,
            quantizer_dropout,
            eps,
        )
        self.seed = seed
        # Every rank advances this generator identically, which is what keeps ranks in agreement.
        self._generator = torch.Generator().manual_seed(seed)
        self._kmeans_buffer: list[torch.Tensor] = []

        shape = (num_quantizers, codebook_size, dim)
        if kmeans_init:
            codebooks = torch.zeros(shape)
        else:
            codebooks = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if learnable == "grad":
            self.codebooks = nn.Parameter(codebooks)
        else:
            self.register_buffer("codebooks", codebooks)
            self.register_buffer("embed_sum", codebooks.clone())
        self.register_buffer("cluster_size", torch.ones(num_quantizers, codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # ||C||^2 per code, cached for the distance addmm. Keyed on the codebooks' version counter
        # and storage, so any in-place change (EMA, optimizer step, load_state_dict, a user's edit,
        # DDP's buffer broadcast) or a move to another device triggers a rebuild before it is used.
        self.register_buffer("_sqnorm", vq_math.code_sqnorm(codebooks), persistent=False)
        self._sqnorm_key: tuple[int, int] | None = None

    # ------------------------------------------------------------------ public API

    def generator_state(self) -> torch.Tensor:
        """State of the generator behind k-means, restarts and dropout, for training checkpoints.

        It is not in ``state_dict()`` (artifacts hold tensors only); ``stages.stage1.RVQStage``
        saves it beside the weights so a resumed run draws what an uninterrupted one would.
        """
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`generator_state` (every rank restores the same state)."""
        self._generator.set_state(state.detach().cpu().to(torch.uint8))

    def kmeans_frames(self) -> list[torch.Tensor]:
        """This rank's frames collected for k-means initialisation so far (empty once initialised)."""
        return [b.detach().cpu() for b in self._kmeans_buffer]

    def set_kmeans_frames(self, frames: list[torch.Tensor]) -> None:
        """Restore :meth:`kmeans_frames` (a resumed run that stopped before k-means had run)."""
        device = self.codebooks.device
        self._kmeans_buffer = [f.to(device=device, dtype=torch.float32) for f in frames]

    def codebook_embeddings(self) -> torch.Tensor:
        """The codebooks, detached: ``[Q, K, D]`` (a view; do not modify in place)."""
        return self.codebooks.detach()

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, n_levels: int | None = None
    ) -> torch.Tensor:
        """Codes of ``x`` with the first ``n_levels`` levels; never updates the codebooks.

        Args:
            x: ``[B, T, D]`` frames.
            mask: ``[B, T]`` bool, True on valid frames; None means all valid.
            n_levels: levels to use (default ``Q``).

        Returns:
            ``[B, n_levels, T]`` long, ``-1`` on padded frames.

        Raises:
            RuntimeError: the codebooks were never initialised (k-means has not run yet).
        """
        if not bool(self.initialized):
            raise RuntimeError(
                "ResidualVQ.encode before initialisation: train (k-means init) or load weights first"
            )
        n = self._check_levels(n_levels)
        flat, valid = self._flatten(x, mask)
        residual = flat.float()
        sqnorm = self._code_sqnorm()
        codes = []
        for level in range(n):
            idx, _ = vq_math.nearest_code(residual, self.codebooks[level], sqnorm[level])
            residual = residual - self.codebooks[level].float().index_select(0, idx)
            codes.append(idx)
        codes = torch.where(valid, torch.stack(codes), PAD_CODE)
        return codes.view(n, *x.shape[:2]).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the level embeddings of ``codes``; uses as many levels as ``codes`` has rows.

        Args:
            codes: ``[B, n, T]`` long with ``n <= Q``; ``-1`` contributes a zero vector.

        Returns:
            ``[B, T, D]`` in the codebooks' dtype (differentiable w.r.t. the codebooks).
        """
        b, n, t = codes.shape
        if n > self.num_quantizers:
            raise ValueError(f"codes have {n} levels, quantizer has {self.num_quantizers}")
        if bool(((codes < PAD_CODE) | (codes >= self.codebook_size)).any()):
            raise ValueError(f"codes must be in [-1, {self.codebook_size})")
        offsets = torch.arange(n, device=codes.device) * self.codebook_size
        rows = codes.transpose(1, 2).reshape(b * t, n)  # [B*T, n]
        weights = (rows != PAD_CODE).to(self.codebooks.dtype)
        flat_idx = (rows.clamp_min(0) + offsets).long()
        table = self.codebooks[:n].reshape(n * self.codebook_size, self.dim)
        out = nn.functional.embedding_bag(flat_idx, table, mode="sum", per_sample_weights=weights)
        return out.view(b, t, self.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RVQOutput:
        """Quantize ``x``; in training mode also initialise / update / restart the codebooks.

        Args:
            x: ``[B, T, D]`` frames (any float dtype; the math runs in fp32, also under autocast).
            mask: ``[B, T]`` bool, True on valid frames; None means all valid.

        Returns:
            :class:`RVQOutput`.
        """
        flat, valid = self._flatten(x, mask)
        update = self.training
        if update and not bool(self.initialized):
            self._collect_for_kmeans(flat, valid)
        update = update and bool(self.initialized)
        n = self._draw_levels() if self.training and self.quantizer_dropout > 0 else self.num_quantizers
        q_levels, k = self.num_quantizers, self.codebook_size

        codebooks, sqnorm = self.codebooks.detach(), self._code_sqnorm()
        residual = flat.detach().float()
        quant_sum = torch.zeros_like(residual)  # P_l: sum of the first l+1 level embeddings
        partial_total = torch.zeros_like(residual) if x.requires_grad else None  # sum_l P_l
        residual_sq = residual.new_zeros(())  # sum over used levels of masked ||x - P_l||^2
        codebook_loss = residual.new_zeros(())
        codes = torch.full((q_levels, flat.shape[0]), PAD_CODE, dtype=torch.long, device=flat.device)
        stats = residual.new_zeros((n, k, self.dim + 1)) if update else None
        level_inputs = []
        for level in range(n):
            idx, _ = vq_math.nearest_code(residual, codebooks[level], sqnorm[level])
            q = codebooks[level].float().index_select(0, idx)
            if update:
                vq_math.accumulate_code_stats_(stats[level], idx, residual, valid)
                level_inputs.append(residual)
            if self.learnable == "grad":
                q_grad = self.codebooks[level].float().index_select(0, idx)
                row_sq = torch.linalg.vector_norm(residual - q_grad, dim=-1).square()
                codebook_loss = codebook_loss + torch.where(valid, row_sq, 0.0).sum()
            codes[level] = idx
            quant_sum = quant_sum + q
            residual = residual - q
            if partial_total is not None:
                partial_total += quant_sum
            residual_sq = (
                residual_sq
                + torch.where(valid, torch.linalg.vector_norm(residual, dim=-1).square(), 0.0).sum()
            )

        if update:
            self._update_codebooks(stats, level_inputs, valid, n)

        denom = valid.sum().clamp_min(1) * self.dim * n
        commit_loss = self.commitment_weight * residual_sq / denom
        if partial_total is not None:
            # d/dx sum_l ||x - P_l||^2 = 2 (n x - sum_l P_l). Attaching this exact gradient to the
            # value above avoids keeping n [N, D] graph nodes alive for autograd.
            grad = 2.0 * self.commitment_weight * (n * flat.detach().float() - partial_total) / denom
            grad = torch.where(valid[:, None], grad, 0.0)
            attach = (torch.where(valid[:, None], flat.float(), 0.0) * grad).sum()  # inf padding stays out
            commit_loss = commit_loss + (attach - attach.detach())
        codebook_loss = codebook_loss / denom

        quantized = flat + (quant_sum.to(flat.dtype) - flat).detach()
        quantized = torch.where(valid[:, None], quantized, torch.zeros_like(quantized))
        codes = torch.where(valid, codes, PAD_CODE)
        usage = self._usage(codes)
        return RVQOutput(
            quantized=quantized.view_as(x),
            codes=codes.view(q_levels, *x.shape[:2]).transpose(0, 1),
            commit_loss=commit_loss,
            codebook_loss=codebook_loss,
            usage=usage,
            perplexity=_perplexity(usage),
            n_levels=n,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
            f"learnable={self.learnable!r}, decay={self.decay}"
        )

    # ------------------------------------------------------------------ internals

    def _flatten(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        if mask is None:
            valid = torch.ones(x.shape[0] * x.shape[1], dtype=torch.bool, device=x.device)
        else:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match x {tuple(x.shape[:2])}")
            valid = mask.reshape(-1).bool()
        return x.reshape(-1, self.dim), valid

    def _check_levels(self, n_levels: int | None) -> int:
        n = self.num_quantizers if n_levels is None else n_levels
        if not 1 <= n <= self.num_quantizers:
            raise ValueError(f"n_levels must be in [1, {self.num_quantizers}], got {n_levels}")
        return n

    def _draw_levels(self) -> int:
        use_dropout = float(torch.rand((), generator=self._generator)) < self.quantizer_dropout
        n = int(torch.randint(1, self.num_quantizers + 1, (), generator=self._generator))
        return n if use_dropout else self.num_quantizers

    @torch.no_grad()
    def _refresh_sqnorm(self) -> None:
        self._sqnorm = vq_math.code_sqnorm(self.codebooks.detach())
        self._sqnorm_key = (self.codebooks._version, self.codebooks.data_ptr())

    def _code_sqnorm(self) -> torch.Tensor:
        """``[Q, K]`` cached ``||C||^2``, rebuilt first if the codebooks changed since."""
        if self._sqnorm_key != (self.codebooks._version, self.codebooks.data_ptr()):
            self._refresh_sqnorm()
        return self._sqnorm

    def _usage(self, codes: torch.Tensor) -> torch.Tensor:
        q_levels, k = self.num_quantizers, self.codebook_size
        offsets = torch.arange(q_levels, device=codes.device)[:, None] * k
        hits = (codes != PAD_CODE).float()
        flat = (codes.clamp_min(0) + offsets).reshape(-1)
        usage = torch.zeros(q_levels * k, device=codes.device).index_add_(0, flat, hits.reshape(-1))
        return usage.view(q_levels, k).long()

    @torch.no_grad()
    def _collect_for_kmeans(self, flat: torch.Tensor, valid: torch.Tensor) -> None:
        self._kmeans_buffer.append(flat.detach().float()[valid])
        local = torch.tensor(
            [float(valid.sum()), float(sum(b.shape[0] for b in self._kmeans_buffer))], device=flat.device
        )
        batch_frames, seen = dist_utils.all_reduce_sum(local).tolist()
        if seen < self.kmeans_buffer_frames:
            return
        frames = dist_utils.all_gather_variable(torch.cat(self._kmeans_buffer))
        self._kmeans_buffer.clear()
        self._kmeans_init(frames, scale=batch_frames / frames.shape[0])

    @torch.no_grad()
    def _kmeans_init(self, frames: torch.Tensor, scale: float) -> None:
        """Level-by-level k-means on ``frames [M, D]`` (identical on every rank), then residuals."""
        residual = frames
        for level in range(self.num_quantizers):
            centroids, counts = vq_math.kmeans(
                residual, self.codebook_size, self.kmeans_iters, self._generator
            )
            dist_utils.broadcast(centroids)
            dist_utils.broadcast(counts)
            self.codebooks[level].copy_(centroids)
            # Counts rescaled to one step's frames, so the EMA starts at its steady-state scale.
            self.cluster_size[level].copy_(counts * scale)
            if self.learnable == "ema":
                self.embed_sum[level].copy_(centroids * self.cluster_size[level][:, None])
            idx, _ = vq_math.nearest_code(residual, centroids)
            residual = residual - centroids.index_select(0, idx)
        self.initialized.fill_(True)
        self._refresh_sqnorm()

    @torch.no_grad()
    def _update_codebooks(
        self, stats: torch.Tensor, level_inputs: list[torch.Tensor], valid: torch.Tensor, n: int
    ) -> None:
        """EMA step on levels ``< n`` from ``stats [n, K, D+1]`` (summed over ranks here), then restarts."""
        dist_utils.all_reduce_sum(stats)
        counts, sums = stats[..., -1], stats[..., :-1]
        if self.learnable == "ema":
            vq_math.ema_update_(self.cluster_size[:n], self.embed_sum[:n], counts, sums, self.decay)
            self.codebooks[:n] = vq_math.smoothed_codebook(
                self.cluster_size[:n], self.embed_sum[:n], self.eps
            )
        else:
            self.cluster_size[:n].lerp_(counts, 1.0 - self.decay)
        if self.dead_code_threshold > 0:
            dead = vq_math.dead_code_mask(self.cluster_size[:n], self.dead_code_threshold)
            # One host sync per step; the mask is identical on every rank (its inputs were all-reduced).
            n_dead = dead.sum(-1).tolist()
            for level, count in enumerate(n_dead):
                if count:
                    self._restart_codes(level, dead[level], level_inputs[level][valid], int(count))
        self._refresh_sqnorm()

    def _restart_codes(self, level: int, dead: torch.Tensor, frames: torch.Tensor, count: int) -> None:
        """Refill ``dead [K]`` codes of ``level`` with residual frames drawn over all ranks."""
        rows = vq_math.sample_global_rows(frames, count, self._generator)
        if rows.shape[0] == 0:
            return
        rows = rows.to(self.codebooks.dtype)
        self.codebooks[level, dead] = rows
        # A revived code starts with an average code's mass: a fair grace period before it can die again.
        mean_usage = self.cluster_size[level].mean()
        self.cluster_size[level, dead] = mean_usage
        if self.learnable == "ema":
            self.embed_sum[level, dead] = rows * mean_usage


def _perplexity(usage: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of each row of ``usage [Q, K]`` counts: ``[Q]`` (1 for an empty row)."""
    p = usage.float() / usage.sum(-1, keepdim=True).clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))
