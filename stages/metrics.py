"""Torchmetrics used by the stages: codebook usage over a whole epoch, correct under DDP.

Utilisation and perplexity follow the Twi stage-1 release's reporting: utilisation is the fraction
of codes used at least once over the validation epoch, perplexity is ``exp(entropy)`` of the code
distribution per level (2048 at most for a 2048-code book).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["CodebookUsage"]


class CodebookUsage(Metric):
    """Counts code hits per level over an epoch; ``compute()`` gives utilisation and perplexity.

    Args:
        num_quantizers: Q, the number of RVQ levels.
        codebook_size: K, codes per level.
    """

    full_state_update = False

    def __init__(self, *, num_quantizers: int, codebook_size: int) -> None:
        super().__init__()
        self.num_quantizers, self.codebook_size = num_quantizers, codebook_size
        self.add_state("counts", default=torch.zeros(num_quantizers, codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of codes.

        Args:
            codes: ``[B, Q, T]`` code ids.
            mask: ``[B, T]`` bool, True for real frames; padding frames are not counted.
        """
        q = codes.shape[1]
        flat = codes.transpose(0, 1).reshape(q, -1)  # [Q, B*T]
        if mask is not None:
            flat = flat[:, mask.reshape(-1)]
        offsets = torch.arange(q, device=flat.device)[:, None] * self.codebook_size
        hits = torch.bincount((flat + offsets).reshape(-1), minlength=self.num_quantizers * self.codebook_size)
        self.counts[:q] += hits.view(self.num_quantizers, self.codebook_size)[:q].to(self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``utilisation [Q]``, ``perplexity [Q]``, ``utilisation_overall`` and ``perplexity_mean``."""
        counts = self.counts.float()
        used = (counts > 0).float().mean(dim=1)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)
        perplexity = entropy.exp()
        return {
            "utilisation": used,
            "perplexity": perplexity,
            "utilisation_overall": used.mean(),
            "perplexity_mean": perplexity.mean(),
        }
