"""The stages' optimiser and learning-rate schedule, injectable from the YAML.

Each stage takes ``optimizer`` (a LightningCLI ``OptimizerCallable``: parameters -> optimiser) and,
where it schedules the rate, ``lr_scheduler`` (an ``LRSchedulerCallable``: optimiser -> scheduler),
as lightning-hydra-template injects them. Left unset, a stage builds today's defaults from its own
``lr``, ``weight_decay`` and ``warmup_steps`` arguments: AdamW over the trainable parameters, and
:class:`WarmupCosine` (linear warm-up, then a constant rate or a cosine decay), stepped every
optimiser step. A config sets them as::

    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 3.0e-4, weight_decay: 0.01}
    lr_scheduler:
      class_path: stages.optim.WarmupCosine
      init_args: {warmup_steps: 1000, decay: cosine, min_lr_ratio: 0.1}

A :class:`WarmupCosine` without ``total_steps`` decays over the whole fit, counted by the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer

__all__ = ["WarmupCosine", "configure", "default_optimizer", "fit_steps", "warmup_factor"]


def warmup_factor(
    step: int, *, warmup_steps: int, total_steps: int | None, min_lr_ratio: float, count_this_step: bool = True
) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based).

    Linear warm-up to 1 over ``warmup_steps``, then, when ``total_steps`` is given, a cosine decay
    to ``min_lr_ratio`` (else 1, a constant rate).

    Args:
        count_this_step: ``True`` (stage 2's schedule) counts ``step + 1`` steps done, so the decay
            starts right after the warm-up's peak and reaches ``min_lr_ratio`` at the last step;
            ``False`` (stage 3's) counts ``step``: the peak is held one more step and the last step
            stays one step short of the floor. Both are kept as they were, so no figure moves.
    """
    if count_this_step:
        warm = max(warmup_steps, 1)
        if step + 1 < warm or total_steps is None:
            return min(1.0, (step + 1) / warm)
        done = min(1.0, (step + 1 - warm) / max(1, total_steps - warm))
    else:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None:
            return 1.0
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up, then a constant rate or a cosine decay to ``min_lr_ratio`` of the peak.

    Args:
        optimizer: the optimiser whose rates it scales (given by the stage).
        warmup_steps: optimiser steps of the linear warm-up.
        decay: ``"constant"`` after the warm-up, or ``"cosine"`` to ``min_lr_ratio * lr`` at
            ``total_steps``.
        min_lr_ratio: the cosine's final rate, as a fraction of the peak.
        total_steps: optimiser steps of the decay's end; ``None``: the fit's, filled in by the stage
            (:func:`configure`) before the first step.
        count_this_step: see :func:`warmup_factor`.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, warmup_steps: int = 0, decay: Literal["constant", "cosine"] = "cosine",
        min_lr_ratio: float = 0.1, total_steps: int | None = None, count_this_step: bool = True, last_epoch: int = -1,
    ) -> None:  # fmt: skip
        if decay not in ("constant", "cosine") or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"decay must be 'constant' or 'cosine' and min_lr_ratio in [0, 1], got {decay!r}, {min_lr_ratio}")
        self.warmup_steps, self.decay, self.min_lr_ratio = warmup_steps, decay, min_lr_ratio
        self.total_steps, self.count_this_step = total_steps, count_this_step
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def factor(self, step: int) -> float:
        total = self.total_steps if self.decay == "cosine" else None
        return warmup_factor(step, warmup_steps=self.warmup_steps, total_steps=total,
                             min_lr_ratio=self.min_lr_ratio, count_this_step=self.count_this_step)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """LambdaLR's state (the step count, the base rates) as a closure schedule saved it: the
        schedule itself comes from the config, so a resumed fit follows the config it resumes with."""
        state = super().state_dict()
        for key in _ARGS:
            state.pop(key, None)
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state


_ARGS = ("warmup_steps", "decay", "min_lr_ratio", "total_steps", "count_this_step")


def default_optimizer(*, lr: float, weight_decay: float) -> Callable[[Iterable], torch.optim.Optimizer]:
    """AdamW with the stage's ``lr`` and ``weight_decay``: what a stage uses when ``optimizer`` is unset."""
    return partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def fit_steps(trainer: Trainer) -> int:
    """Optimiser steps of the whole fit: ``trainer.max_steps``, else the datamodule's batches per
    epoch times ``max_epochs`` (it counts them from its index), else Lightning's estimate."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "batches_per_epoch") and trainer.max_epochs:
        datamodule.setup("fit")
        per_epoch = datamodule.batches_per_epoch("train")
        return max(1, per_epoch * int(trainer.max_epochs) // max(1, trainer.accumulate_grad_batches))
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("a cosine schedule needs trainer.max_steps (or a datamodule that counts its batches)")
    return int(total)


def configure(
    params: Iterable, *, optimizer: Callable[[Iterable], torch.optim.Optimizer],
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None, total_steps: Callable[[], int],
) -> Any:  # fmt: skip
    """What ``configure_optimizers`` returns: the optimiser, and its scheduler stepped per optimiser step.

    Args:
        params: the trainable parameters (or parameter groups).
        optimizer: parameters -> optimiser.
        lr_scheduler: optimiser -> scheduler, or ``None`` (no schedule).
        total_steps: the fit's optimiser steps, asked only by a cosine :class:`WarmupCosine` without
            ``total_steps``.
    """
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    sched = lr_scheduler(opt)
    if isinstance(sched, WarmupCosine) and sched.decay == "cosine" and sched.total_steps is None:
        sched.total_steps = total_steps()
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
