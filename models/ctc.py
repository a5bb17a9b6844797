"""CTC over the audio positions of an LLM's input, through its frozen ``lm_head``.

Follows DiffusionGemma ASR: a CTC loss between the final hidden states at the audio positions and
the transcript's text tokens pushes a frozen backbone to read the audio (blank = the pad token). The
audio positions are Gemma 4's audio slots (``input_mode="embeddings"``) or the sound tokens
(``"tokens"``); each utterance is one contiguous run of positions, runs taken row-major.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.chat_format import IGNORE_INDEX

__all__ = ["audio_runs", "segment_ctc"]


def audio_runs(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """Contiguous True runs of a [B, L] mask as (row, start, end), row-major: one per audio segment."""
    runs = []
    for b, row in enumerate(mask.tolist()):
        start = None
        for i, v in enumerate([*row, False]):
            if v and start is None:
                start = i
            elif not v and start is not None:
                runs.append((b, start, i))
                start = None
    return runs


def segment_ctc(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    *,
    logits: Callable[[torch.Tensor], torch.Tensor],
    blank: int,
) -> torch.Tensor:
    """Mean CTC loss of each audio segment against its target row.

    Args:
        hidden: Final hidden states [B, L, H].
        positions: [B, L] bool, True at audio positions; N contiguous runs.
        targets: [N, S] target ids, padded with ``IGNORE_INDEX``, one row per run in row-major order.
        logits: ``lm_head`` (and soft-capping): [T, H] -> [T, V].
        blank: The blank id (the pad token: never a target).

    Returns:
        Scalar loss (infeasible alignments, more targets than positions, count 0).
    """
    runs = audio_runs(positions)
    if len(runs) != targets.shape[0]:
        raise ValueError(f"{len(runs)} audio segments but {targets.shape[0]} ctc_targets rows")
    frames = [hidden[b, s:e] for b, s, e in runs]
    log_probs = nn.utils.rnn.pad_sequence([logits(f).float() for f in frames]).log_softmax(-1)  # [T, N, V]
    return F.ctc_loss(
        log_probs,
        targets.clamp(min=0),
        torch.tensor([f.shape[0] for f in frames], device=hidden.device),
        (targets != IGNORE_INDEX).sum(1),
        blank=blank,
        zero_infinity=True,
    )
