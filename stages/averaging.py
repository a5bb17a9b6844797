"""Checkpoint averaging: a fit ends with best, final and averaged weights.

The Twi stage-1 release ships best, final and averaged RVQ checkpoints and recommends the averaged
one. ``final.ckpt`` is written at the end of ``fit`` (``last.ckpt`` is only as recent as the last
validation). :class:`CheckpointAveraging` keeps the module's floating-point weights at each validation
(the last ``n``), or averages the ``n`` best checkpoints that ``ModelCheckpoint`` kept, and writes
``averaged.ckpt`` beside them at the end of ``fit``. The CLI then validates best, final and averaged
alike (``SpeechlessCLI.after_fit``) and writes ``checkpoint_metrics.json``.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["CheckpointAveraging", "average_state_dicts", "checkpoint_candidates", "save_final_checkpoint"]


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of floating-point tensors; other tensors (counters, ids) are taken from the last one."""
    if not state_dicts:
        raise ValueError("nothing to average")
    out = {}
    for key, last in state_dicts[-1].items():
        if torch.is_tensor(last) and last.is_floating_point():
            out[key] = torch.stack([sd[key].double() for sd in state_dicts]).mean(0).to(last.dtype)
        else:
            out[key] = last
    return out


def _model_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    return trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None


class CheckpointAveraging(Callback):
    """Write ``averaged.ckpt``: the mean of the last ``n`` validated weights or of the top-``n``.

    Args:
        n: how many to average.
        mode: ``"last"`` (weights at the last ``n`` validations, kept in CPU memory) or ``"top_k"``
            (the ``n`` best checkpoints kept by ``ModelCheckpoint``; set its ``save_top_k >= n``).
        filename: name of the averaged checkpoint, in ``ModelCheckpoint.dirpath``.
    """

    def __init__(self, *, n: int = 3, mode: Literal["last", "top_k"] = "last", filename: str = "averaged.ckpt") -> None:
        super().__init__()
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n, self.mode, self.filename = n, mode, filename
        self._ring: deque[dict[str, torch.Tensor]] = deque(maxlen=n)
        self.path: str | None = None
        self.final_path: str | None = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "last" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._ring.append({k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()})

    def _sources(self, trainer: Trainer) -> list[dict[str, torch.Tensor]]:
        if self.mode == "last":
            return list(self._ring)
        ckpt = _model_checkpoint(trainer)
        if ckpt is None or not ckpt.best_k_models:
            return []
        best = sorted(ckpt.best_k_models.items(), key=lambda kv: float(kv[1]), reverse=ckpt.mode == "max")
        return [torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p, _ in best[: self.n]]

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ckpt = _model_checkpoint(trainer)
        if ckpt is None or ckpt.dirpath is None:
            return
        self.final_path = save_final_checkpoint(trainer)
        sources = self._sources(trainer)
        if not sources:
            return
        averaged = average_state_dicts(sources)
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(averaged)
        self.path = os.path.join(ckpt.dirpath, self.filename)
        # Every rank calls save_checkpoint; the strategy writes once.
        trainer.save_checkpoint(self.path, weights_only=False)
        pl_module.load_state_dict(current)


def save_final_checkpoint(trainer: Trainer) -> str | None:
    """Write ``final.ckpt``, the weights the fit ended with, beside ``ModelCheckpoint``'s files.

    ``last.ckpt`` is no such thing: Lightning writes it only when a top-k checkpoint is saved (or at
    a validation), so after epochs that did not improve the monitor it holds older weights. Every
    rank calls this (the strategy writes once).
    """
    ckpt = _model_checkpoint(trainer)
    if ckpt is None or ckpt.dirpath is None:
        return None
    path = os.path.join(ckpt.dirpath, "final.ckpt")
    trainer.save_checkpoint(path, weights_only=False)
    return path


def checkpoint_candidates(trainer: Trainer) -> dict[str, str]:
    """``{"best": path, "final": path, "averaged": path}`` for the checkpoints a fit produced."""
    out: dict[str, str] = {}
    ckpt = _model_checkpoint(trainer)
    if ckpt is not None:
        if ckpt.best_model_path:
            out["best"] = ckpt.best_model_path
        final = os.path.join(ckpt.dirpath, "final.ckpt") if ckpt.dirpath else None
        if final and os.path.exists(final):
            out["final"] = final
        elif ckpt.last_model_path:
            out["final"] = ckpt.last_model_path
    for cb in trainer.callbacks:
        if isinstance(cb, CheckpointAveraging):
            if cb.final_path and os.path.exists(cb.final_path):
                out["final"] = cb.final_path
            if cb.path and os.path.exists(cb.path):
                out["averaged"] = cb.path
    return out
