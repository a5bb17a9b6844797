"""What makes ``lightning fit ... --ckpt_path last.ckpt`` continue the killed run exactly.

Lightning restores the weights, optimizer, schedulers, loop counters and every callback's
``state_dict``; this project adds what it does not:

- the data position (``datamodules/resume.py``): the epoch to read and, inside an epoch, the
  batches already trained;
- the random state of training steps (:class:`ExactResume`): torch, numpy and ``random`` are seeded
  at each training batch from ``(seed, epoch, batch index, rank)``, so dropout and any other draw of
  a step are the same whether the run was interrupted or not (a restored RNG snapshot would not be:
  the draws Lightning makes between a checkpoint and the next step differ on a restart);
- the RVQ's own generator and k-means buffer (``stages/stage1.py``), and the averaging buffer
  (``stages/averaging.py``);
- what ``ModelCheckpoint`` forgets (:class:`ExactResume`): it does not checkpoint that it has saved
  a file, so a resumed fit that saves no new top-k file rewrites ``last.ckpt`` at its end, which
  the uninterrupted fit does not;
- the run folder (:func:`resume_version`): a resumed fit logs and checkpoints into the folder of the
  checkpoint it resumes, not into a new ``version_N``.

The CLI adds :class:`ExactResume` to every trainer; a config need not name it.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["ExactResume", "resume_version", "step_seed"]


def step_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ExactResume(Callback):
    """Seed each training batch; restore what ``ModelCheckpoint`` does not checkpoint.

    Before each training batch, torch (CPU and CUDA), numpy and ``random`` are seeded from
    ``seed_everything``'s seed (``PL_GLOBAL_SEED``, else ``seed``), the epoch, the batch index in the
    epoch and the global rank: ranks draw different dropout masks, and a resumed run draws what the
    uninterrupted run drew at the same batch.

    At the start of a resumed fit, each ``ModelCheckpoint`` that had saved a file is told so (and
    at which step), as it would know in the uninterrupted run.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        for cb in trainer.checkpoint_callbacks:
            saved = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            if saved and hasattr(cb, "_last_checkpoint_saved"):  # private in Lightning 2.6; see the test
                cb._last_checkpoint_saved = saved
                cb._last_global_step_saved = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = step_seed(base, trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed(seed)  # also seeds every CUDA device
        random.seed(seed)
        np.random.seed(seed % (1 << 32))


def resume_version(ckpt_path: str | os.PathLike | None, save_dir: str | os.PathLike, name: str | None) -> int | str | None:
    """The logger version of the run folder ``ckpt_path`` lies in, or None when it is not one.

    A checkpoint ``<save_dir>/<name>/version_3/checkpoints/last.ckpt`` gives ``3`` (a folder
    named otherwise, e.g. an explicit ``version: v2``, gives its name), so the resumed fit writes
    its logs and checkpoints into ``version_3`` again.
    """
    if not ckpt_path or "://" in str(ckpt_path):
        return None
    ckpt = Path(ckpt_path).resolve()
    if ckpt.parent.name != "checkpoints":
        return None
    run = ckpt.parent.parent
    root = Path(save_dir).resolve() / (name or "")
    if run.parent != root.resolve():
        return None
    if run.name.startswith("version_") and run.name[len("version_") :].isdigit():
        return int(run.name[len("version_") :])
    return run.name
