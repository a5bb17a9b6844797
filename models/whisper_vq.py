"""Ichigo's WhisperVQ: one cosine-similarity VQ over a frozen Whisper encoder, read by its frozen decoder.

Follows Ichigo-Whisper (Homebrew, janhq/WhisperSpeech ``ichigo-whisper``; its ancestor is
collabora/WhisperSpeech's ``vq_stoks.py``, task ``medium-vi-2d-2048c-dim64``): Whisper-medium's
encoder states, mean-pooled 2x to 25 frames/s (here by ``WhisperEncoder(pooling=2)``), pass a
residual MLP block, are projected to a 64-dim codebook space and quantized by a single cosine VQ
(inputs and codes l2-normalised, codes learnt by EMA, dead codes restarted from batch frames); the
codes are projected back, repeated 2x to Whisper's 50 frames/s, given positions and one small
transformer block, and the frozen Whisper decoder reads the result as its encoder output.

The code book ``[K, c]`` holds the learnt codes and one **mask code** (``mask_code``, by default the
last row), Ichigo's code of padding frames: here the vector that padded frames carry into the
transformer block, which never attends to them (a key-padding mask, so a clip's states do not
depend on its batch); they decode to zeros. ``encode`` never emits it (it writes ``-1`` on padding,
as every stage-1 tokenizer does), so the token vocabulary keeps Ichigo's layout. Ichigo's released book is two books merged
(:func:`merge_codebooks`): the 2048 codes and mask code of the new one, then the 512 codes of the
earlier one, 2561 in all; its 2048 codes were initialised by tiling the 512 with small noise
(:func:`tile_codebook`).

Frame rates: ``encode(x [B, T, D]) -> [B, 1, T]`` at the encoder's 25 frames/s; ``decode(codes
[B, 1, T]) -> [B, 2T, D]`` at **50 frames/s** (``decode_upsample = 2``), Whisper's own encoder rate,
which the decoder reads without repeating frames (stage 2's ``WhisperASR`` gets ``pooling = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import distributed as dist_utils
from models.quantizer import PAD_CODE, SemanticQuantizer
from models.vq_math import accumulate_code_stats_, ema_update_, sample_global_rows

__all__ = ["WhisperVQ", "WhisperVQOutput", "merge_codebooks", "tile_codebook"]


@dataclass
class WhisperVQOutput:
    """What a training forward gives.

    Attributes:
        codes: ``[B, 1, T]`` long, ``-1`` on padding.
        states: ``[B, 2T, D]`` decoder-ready states at 50 frames/s (zeros past each clip's frames).
        lengths: ``[B]`` real frames of ``states`` (``2 x`` the real codes).
        commit_loss: mean ``||z - sg(q)||^2`` over real frames (inputs and codes are unit vectors).
    """

    codes: Tensor
    states: Tensor
    lengths: Tensor
    commit_loss: Tensor


def tile_codebook(source: Tensor, size: int, *, noise: float = 0.01, generator: torch.Generator | None = None) -> Tensor:
    """A ``[size, c]`` book of unit rows: ``source`` repeated (row ``i`` is ``source[i % M]``) plus noise.

    Ichigo starts its 2048-code book from the earlier 512-code one this way ("dup_noise"), so the
    new book begins where the old one was and the copies drift apart as training splits them.

    Args:
        source: ``[M, c]`` codes (normalised here).
        size: rows wanted.
        noise: standard deviation of the Gaussian noise added to each unit row.
        generator: CPU generator for the noise.
    """
    if source.ndim != 2 or source.shape[0] == 0:
        raise ValueError(f"source must be a non-empty [M, c] book, got {tuple(source.shape)}")
    base = F.normalize(source.detach().float().cpu(), dim=-1)
    rows = base[torch.arange(size) % base.shape[0]]
    return F.normalize(rows + noise * torch.randn(rows.shape, generator=generator), dim=-1)


class WhisperVQ(SemanticQuantizer):
    """Ichigo's single cosine VQ between a frozen Whisper encoder and its frozen decoder.

    Args:
        dim: ``D``, the Whisper model's ``d_model`` (1024 for medium, 384 for tiny).
        codebook_size: ``K``, rows of the book including the mask code (2049 = 2048 + mask).
        mask_code: index of the mask code (default ``K - 1``; 2048 in a merged 2561-code book).
        codebook_dim: ``c``, the codebook space (64 in Ichigo).
        window: Whisper frames (50 frames/s) of the positional table: the decoder's window
            (``max_source_positions``, 1500 for the real models).
        heads: attention heads of the transformer block.
        depth: transformer blocks after the VQ.
        mlp_mult: hidden width of the residual MLP and the block's FFN, in multiples of ``D``.
        decay: EMA decay of the code statistics per step.
        dead_code_threshold: a code whose EMA count falls below this (frames per step) is restarted
            from a random real frame of the step (all ranks alike).
        dead_code_grace: steps a fresh code (initialised or restarted) has before it can be
            restarted: it starts with the EMA count ``threshold / decay ** grace`` and its own vector
            as the EMA sum, as if it had been used that often.
        seed: seed of the generator for the book's initialisation and restarts.
    """

    decode_upsample = 2  # decode gives 2 frames per code: Whisper's 50 frames/s

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int = 2049,
        mask_code: int | None = None,
        codebook_dim: int = 64,
        window: int = 1500,
        heads: int = 16,
        depth: int = 1,
        mlp_mult: int = 4,
        decay: float = 0.99,
        dead_code_threshold: float = 2.0,
        dead_code_grace: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2 (codes + the mask code), got {codebook_size}")
        mask_code = codebook_size - 1 if mask_code is None else mask_code
        if not 0 <= mask_code < codebook_size:
            raise ValueError(f"mask_code must be in [0, {codebook_size}), got {mask_code}")
        if not 0.0 <= decay < 1.0 or window < 2 or window % 2:
            raise ValueError(f"decay must be in [0, 1) and window an even number of frames, got {decay}, {window}")
        self.num_quantizers, self.codebook_size, self.dim = 1, codebook_size, dim
        self.mask_code, self.codebook_dim, self.window = mask_code, codebook_dim, window
        self.decay, self.dead_code_threshold = decay, dead_code_threshold
        self.fresh_count = dead_code_threshold / decay**dead_code_grace if decay > 0 else dead_code_threshold
        self.mlp_ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_mult * dim), nn.GELU(), nn.Linear(mlp_mult * dim, dim))
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self.positions = nn.Embedding(window, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp_mult * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.ln_post = nn.LayerNorm(dim)
        self._generator = torch.Generator().manual_seed(seed)
        book = F.normalize(torch.randn(codebook_size, codebook_dim, generator=self._generator), dim=-1)
        self.register_buffer("codebook", book)  # [K, c] unit rows; row mask_code is the mask code
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA frames per code
        self.register_buffer("embed_sum", torch.zeros(codebook_size, codebook_dim))  # EMA sums of unit inputs
        self._refresh(self.real_codes)

    # ---- the codebook ---------------------------------------------------------------------------
    @property
    def real_codes(self) -> Tensor:
        """``[K]`` bool: the codes a real frame may get (all but the mask code)."""
        keep = torch.ones(self.codebook_size, dtype=torch.bool, device=self.codebook.device)
        keep[self.mask_code] = False
        return keep

    @torch.no_grad()
    def init_codebook_from(self, source: Tensor, *, noise: float = 0.01) -> None:
        """Fill the real codes by :func:`tile_codebook` of ``source [M, c]``; EMA statistics restart."""
        if source.shape[-1] != self.codebook_dim:
            raise ValueError(f"source codes are {source.shape[-1]}-dim, this book is {self.codebook_dim}-dim")
        keep = self.real_codes
        tiled = tile_codebook(source, int(keep.sum()), noise=noise, generator=self._generator)
        self.codebook[keep] = tiled.to(self.codebook)
        self._refresh(keep)

    @torch.no_grad()
    def _refresh(self, rows: Tensor) -> None:
        """Give ``rows`` (bool ``[K]``) fresh EMA statistics: count ``fresh_count``, sum = their vector."""
        self.cluster_size[rows] = self.fresh_count
        self.embed_sum[rows] = self.codebook[rows] * self.fresh_count

    def generator_state(self) -> Tensor:
        return self._generator.get_state()

    def set_generator_state(self, state: Tensor) -> None:
        self._generator.set_state(state)

    # ---- encoder side ---------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        """``[B, T, D]`` encoder states -> ``[B, T, c]`` unit vectors (residual MLP, projection)."""
        x = x + self.mlp(self.mlp_ln(x))
        return F.normalize(self.project_in(x).float(), dim=-1)

    def _nearest(self, z: Tensor) -> Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            scores = z.float() @ self.codebook.float().t()  # cosine: both sides are unit vectors
        scores[..., self.mask_code] = float("-inf")
        return scores.argmax(-1)

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, T, D]`` states (25 frames/s) -> ``[B, 1, T]`` codes, ``-1`` where ``mask`` is False."""
        codes = self._nearest(self.project(x))
        if mask is not None:
            codes = codes.masked_fill(~mask.to(codes.device), PAD_CODE)
        return codes[:, None]

    # ---- decoder side ---------------------------------------------------------------------------
    def lookup(self, codes: Tensor) -> Tensor:
        """``[B, T]`` codes -> ``[B, T, c]`` book rows; ``-1`` reads the mask code."""
        codes = torch.where(codes < 0, self.mask_code, codes)
        if codes.numel() and int(codes.max()) >= self.codebook_size:
            raise ValueError(f"code {int(codes.max())} is outside the {self.codebook_size}-code book")
        return self.codebook[codes]

    def states_from(self, q: Tensor, valid: Tensor) -> Tensor:
        """Book vectors ``[B, T, c]`` at 25 frames/s -> decoder-ready states ``[B, 2T, D]`` at 50 frames/s.

        Projected back, repeated 2x, given positions and the transformer block, which attends to
        the ``valid [B, T]`` frames only (so a clip's states do not depend on its batch), then
        layer-normed; frames of invalid codes are zeros.
        """
        if q.shape[1] * 2 > self.window:
            raise ValueError(f"{q.shape[1]} codes are {2 * q.shape[1]} Whisper frames, more than the "
                             f"{self.window}-frame window: decode() splits long code sequences")
        x = self.project_out(q.to(self.project_out.weight.dtype)).repeat_interleave(2, dim=1)
        x = x + self.positions.weight[: x.shape[1]]
        pad = ~valid.to(x.device).repeat_interleave(2, dim=1)  # [B, 2T], True = padding
        keys = pad.clone()
        keys[:, 0] = False  # an empty row (a weight-0 sample) attends to its first frame, not to nothing (NaN)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=keys if bool(keys.any()) else None)
        return self.ln_post(x).masked_fill(pad[..., None], 0.0)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """``[B, 1, T]`` codes -> ``[B, 2T, D]`` states at 50 frames/s that the frozen decoder reads.

        ``-1`` frames are padding: not attended to, decoded to zeros (the mask code, given by its
        index, is a frame like any other). Codes longer than a window are decoded window by window.
        """
        if codes.ndim != 3 or codes.shape[1] != 1:
            raise ValueError(f"codes must be [B, 1, T], got {tuple(codes.shape)}")
        codes = codes[:, 0].to(self.codebook.device)
        if codes.shape[1] == 0:
            return self.codebook.new_zeros(codes.shape[0], 0, self.dim)
        step = self.window // 2
        parts = [self.states_from(self.lookup(piece), piece >= 0) for piece in codes.split(step, dim=1)]
        return torch.cat(parts, dim=1)

    # ---- training ------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor) -> WhisperVQOutput:
        """Quantize with a straight-through gradient; in training mode also update the book (EMA).

        Args:
            x: ``[B, T, D]`` encoder states at 25 frames/s.
            mask: ``[B, T]`` bool, False on padding (and on weight-0 samples).
        """
        z = self.project(x)  # [B, T, c] unit
        codes = self._nearest(z.detach())
        q = self.codebook[codes]
        n = mask.sum().clamp_min(1)
        commit = (((z - q.detach()) ** 2).sum(-1) * mask).sum() / n
        if self.training:
            self._ema_update(z.detach(), codes, mask)
        q = z + (q - z).detach()  # straight-through
        q = torch.where(mask[..., None], q, self.codebook[self.mask_code].to(q))
        states = self.states_from(q, mask)
        return WhisperVQOutput(codes=codes.masked_fill(~mask, PAD_CODE)[:, None], states=states,
                               lengths=2 * mask.sum(1), commit_loss=commit)

    @torch.no_grad()
    def _ema_update(self, z: Tensor, codes: Tensor, mask: Tensor) -> None:
        """EMA of counts and sums of the unit inputs (summed over ranks), then dead-code restarts."""
        flat, idx, valid = z.reshape(-1, z.shape[-1]), codes.reshape(-1), mask.reshape(-1)
        stats = torch.zeros(self.codebook_size, self.codebook_dim + 1, device=z.device)
        accumulate_code_stats_(stats, idx, flat, valid)
        stats = dist_utils.all_reduce_sum(stats)
        ema_update_(self.cluster_size, self.embed_sum, stats[:, -1], stats[:, :-1], self.decay)
        norm = self.embed_sum.norm(dim=-1, keepdim=True)
        learnt = (norm[:, 0] > 1e-12) & self.real_codes
        self.codebook[learnt] = (self.embed_sum / norm.clamp_min(1e-12))[learnt]
        dead = (self.cluster_size < self.dead_code_threshold) & self.real_codes
        n_dead = int(dead.sum())  # the same on every rank: the statistics are all-reduced
        if n_dead:
            fresh = sample_global_rows(flat[valid], n_dead, self._generator)
            if fresh.shape[0]:
                self.codebook[dead] = F.normalize(fresh.to(self.codebook), dim=-1)
                self._refresh(dead)


def merge_codebooks(
    new: dict[str, Tensor], old: dict[str, Tensor], *, old_mask_code: int | None, fresh_count: float = 0.0
) -> tuple[dict[str, Tensor], int]:
    """Ichigo's merge of two WhisperVQ state dicts into one book: new codes, new mask, then the old codes.

    The result keeps every weight of ``new`` and a book of ``K_new + M_old`` rows: rows
    ``[0, K_new)`` are ``new``'s book as it was (its real codes and its mask code), rows ``[K_new, K_new + M_old)`` are ``old``'s real codes in their order
    (its mask code dropped). With Ichigo's books (2048 codes + mask at 2048; 512 earlier codes):
    2561 rows, mask at 2048, the earlier code ``j`` at ``2049 + j``. EMA statistics are kept for
    ``new``'s rows; the old codes start fresh (``fresh_count``, as a restarted code).

    Args:
        new, old: ``WhisperVQ.state_dict()`` of each.
        old_mask_code: the mask code's index in ``old`` (None: ``old`` has none, all rows are codes).
        fresh_count: the EMA count the old codes start with (the merged quantizer's ``fresh_count``).

    Returns:
        ``(state_dict, codebook_size)`` of the merged quantizer; its mask code keeps its index in ``new``.

    Raises:
        ValueError: The books' code dimensions differ.
    """
    book_new, book_old = new["codebook"], old["codebook"]
    if book_new.shape[-1] != book_old.shape[-1]:
        raise ValueError(f"cannot merge a {book_new.shape[-1]}-dim code book with a {book_old.shape[-1]}-dim one")
    keep = torch.ones(book_old.shape[0], dtype=torch.bool)
    if old_mask_code is not None:
        keep[old_mask_code] = False
    extra = book_old[keep].to(book_new)
    merged = dict(new)
    merged["codebook"] = torch.cat([book_new, extra])
    merged["cluster_size"] = torch.cat([new["cluster_size"], new["cluster_size"].new_full((extra.shape[0],), fresh_count)])
    merged["embed_sum"] = torch.cat([new["embed_sum"], extra * fresh_count])
    return merged, int(merged["codebook"].shape[0])
