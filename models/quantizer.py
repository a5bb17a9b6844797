"""What every stage-1 tokenizer is to the stages after it: frozen encoder states <-> discrete codes.

Three tokenizers share this contract: the residual VQ of Speechless (:class:`models.rvq.ResidualVQ`,
``Q`` levels), Ichigo's WhisperVQ (one level, decoded for a frozen Whisper decoder) and SpireLM's
k-means units (one level). Stage 2 learns to write their codes, stage 3 reads them (as sound tokens
or decoded states), and a promoted stage-1 artifact's ``quantizer`` must be of this kind
(``stages.artifacts.ARTIFACT_KINDS``).

The contract (``B`` utterances, ``T`` frames of the encoder, ``D = dim``):

- ``num_quantizers`` (``Q``), ``codebook_size`` (``K``) and ``dim`` attributes;
- ``encode(x [B, T, D], mask [B, T] | None) -> [B, Q, T]`` long codes in ``[0, K)``, ``-1`` on padded
  frames; never updates the tokenizer; keeps the frame count (a tokenizer that changes the frame
  rate does it in its encoder, e.g. ``WhisperEncoder(pooling=2)``);
- ``decode(codes [B, Q, T]) -> [B, T, D]`` states in the encoder's space (what stage 2 scores
  generations by, what the Whisper decoder and a projector read); ``-1`` decodes to zeros.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PAD_CODE", "SemanticQuantizer"]

PAD_CODE = -1


class SemanticQuantizer(nn.Module):
    """Base class of stage-1 tokenizers: see the module docstring for the contract."""

    num_quantizers: int
    codebook_size: int
    dim: int

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
