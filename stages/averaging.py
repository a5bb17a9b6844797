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
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file

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

    In ``"last"`` mode the weights of each validation are also written (by global rank 0) to
    ``<checkpoint dir>/averaging/step-<global step>.safetensors``, and the callback's checkpointed
    state names the files of its buffer, so a fit killed and resumed with ``--ckpt_path last.ckpt``
    averages exactly the weights the uninterrupted fit would have (the buffer would otherwise start
    empty). The files stay out of the checkpoint because ``n`` copies of a 270M-parameter stage-2
    model would quadruple every checkpoint; a file leaves the folder one validation after it left
    the buffer, so the buffer named by the newest saved checkpoint is always on disk. Resuming from
    an older checkpoint whose files are gone warns and averages what is left.

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
        self._ring_files: deque[str] = deque(maxlen=n)  # names under <dirpath>/averaging
        self._pending: list[str] = []  # restored names to load once the checkpoint dir is known
        self.path: str | None = None
        self.final_path: str | None = None

    @staticmethod
    def _ring_dir(trainer: Trainer) -> str | None:
        ckpt = _model_checkpoint(trainer)
        return os.path.join(ckpt.dirpath, "averaging") if ckpt is not None and ckpt.dirpath else None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode != "last" or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        self._restore_ring(trainer)
        weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        self._ring.append(weights)
        folder = self._ring_dir(trainer)
        if folder is None:
            return
        name = f"step-{trainer.global_step}.safetensors"
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.tmp")
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp)
            os.replace(tmp, os.path.join(folder, name))
            # Keep the files of the previous buffer too: the newest checkpoint on disk may name them.
            keep = set(self._ring_files) | {name}
            for old in os.listdir(folder):
                if old.endswith(".safetensors") and old not in keep:
                    os.remove(os.path.join(folder, old))
        self._ring_files.append(name)

    def state_dict(self) -> dict:
        return {"ring_files": list(self._ring_files)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = list(state_dict.get("ring_files", []))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_ring(trainer)

    def _restore_ring(self, trainer: Trainer) -> None:
        if not self._pending:
            return
        folder, names, self._pending = self._ring_dir(trainer), self._pending, []
        self._ring.clear()
        self._ring_files.clear()
        for name in names:
            path = os.path.join(folder, name) if folder else None
            if path is None or not os.path.exists(path):
                rank_zero_warn(f"CheckpointAveraging: {name} of the resumed buffer is gone; averaging without it")
                continue
            self._ring.append(load_file(path))
            self._ring_files.append(name)

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
