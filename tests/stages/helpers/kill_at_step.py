"""A callback for the resume tests: ``kill -9`` of its own process at a given training step.

Used as ``--trainer.callbacks+=kill_at_step.KillAtStep --trainer.callbacks.step N`` with this folder
on ``PYTHONPATH``. SIGKILL cannot be caught: nothing is flushed, closed or saved, as when a node dies
or a scheduler kills a job. It fires at the start of the batch that would take optimizer step ``N``
(before any of that batch's work), and also records each batch's keys, to compare data orders.
"""

from __future__ import annotations

import json
import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    def __init__(self, step: int = -1, record: str | None = None) -> None:
        self.step, self.record = step, record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.record and trainer.is_global_zero:
            keys = batch.get("keys") if isinstance(batch, dict) else None
            if keys is None and isinstance(batch, dict) and "input_ids" in batch:
                keys = [int(x) for x in batch["input_ids"].sum(1)]  # a fingerprint of each example
            with open(self.record, "a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step, "keys": keys}) + "\n")
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
