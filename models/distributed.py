"""The few ``torch.distributed`` collectives the quantizer needs, as no-ops outside DDP.

Follows vector-quantize-pytorch's approach (plain ``torch.distributed``, no framework): every helper
works unchanged in a single process, so the quantizer has one code path. ``all_gather_variable``
gathers row blocks whose row count differs per rank (padding to the largest, then trimming), which
``dist.all_gather`` alone cannot do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_variable", "all_reduce_sum", "broadcast", "is_dist", "rank", "world_size"]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside DDP)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank (0 outside DDP)."""
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place.

    Args:
        tensor: any shape; must have the same shape and dtype on every rank.

    Returns:
        The same tensor object, now holding the sum over ranks.
    """
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy.

    Args:
        tensor: any shape; same shape and dtype on every rank.
        src: rank whose values win.

    Returns:
        The same tensor object.
    """
    if is_dist():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows, in rank order, when row counts differ per rank.

    Args:
        tensor: ``[N_r, ...]``; ``N_r`` may differ per rank (zero included), trailing dims and
            dtype must match.

    Returns:
        ``[sum_r N_r, ...]``: rank 0's rows, then rank 1's, ... identical on every rank.
    """
    if not is_dist():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)], dim=0)
