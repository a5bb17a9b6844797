"""Skipped samples on the record: per-reason counts of every fit, validate, test and predict.

The shard pipeline skips a corrupt sample and counts it (``datamodules.pipeline.SkipCounter``); each
batch of ``ShardDataset`` carries ``batch["skipped"]``, the counts by reason since that worker's
previous batch. :class:`SkipTally` (which ``SpeechlessCLI`` adds to every trainer) sums them with the
real samples used (``sample_weight > 0``), over all DDP ranks, and logs per split::

    skipped/<split>/<reason>   skipped samples of that reason
    skipped/<split>/total      all skipped samples
    skipped/<split>/used       real samples used (padding excluded)
    skipped/<split>/fraction   total / (total + used)

``train`` counts are cumulative over the whole fit and ride in checkpoints (a resumed fit goes on
counting); ``val``, ``test`` and ``predict`` count one run of their loop. Ranks are summed at each
epoch end (one ``all_gather_object`` that every rank reaches in the same hook), so the counts are
those of the whole run, not of rank 0, and a checkpoint holds the train counts as of the last epoch
end or validation. A data module whose batches carry no ``skipped`` (stage 3's, which refuses a bad
sample at start-up instead) is recorded with zero skips.

Validating a checkpoint (``trainer.validate(ckpt_path=...)``) restores its train counts with the
other callback states, so each candidate the CLI validates after ``fit`` reports the train counts of
the fit up to that checkpoint (``best`` may be an earlier epoch; ``final`` and ``averaged`` hold the
whole fit), and ``speechless-promote`` reads them from the checkpoint it promotes. Promotion reads the
tally: ``skipped/train/*`` join the gated metrics (``skipped/val/*`` are validation metrics already)
and ``provenance["data"]["skipped"]`` holds :meth:`SkipTally.record` per split, so a gate such as
``skipped/train/fraction: {max: 0.01}`` refuses a run on corrupt data.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["SkipTally", "batch_samples", "explain_skips", "skip_tally", "with_skip_tally"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "predict")
_SUMMARY_KEYS = ("total", "used", "fraction")


def batch_samples(batch: Any) -> int:
    """Real samples in a batch: ``sample_weight > 0`` where given, else the batch size."""
    if not isinstance(batch, dict):
        return 0
    weight = batch.get("sample_weight")
    if torch.is_tensor(weight):
        return int((weight > 0).sum())
    if isinstance(batch.get("keys"), (list, tuple)):
        return len(batch["keys"])
    first = batch.get("input_ids")
    if not torch.is_tensor(first):
        first = next((v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 0


class SkipTally(Callback):
    """Counts skipped and used samples per split and logs them as ``skipped/<split>/...`` metrics.

    Every rank keeps its own counts since the last sync (``_pending``) and the all-rank totals
    (``_totals``, the same on every rank); only the totals are logged, checkpointed and recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self._totals: dict[str, tuple[Counter[str], int]] = {}
        self._pending: dict[str, tuple[Counter[str], int]] = {}

    # ---- counting ----------------------------------------------------------------------------
    def add(self, split: str, batch: Any) -> None:
        """Count one batch's skips (``batch["skipped"]``) and real samples on this rank."""
        skipped, used = self._pending.setdefault(split, (Counter(), 0))
        if isinstance(batch, dict) and isinstance(batch.get("skipped"), dict):
            skipped.update({str(k): int(v) for k, v in batch["skipped"].items() if v})
        self._pending[split] = (skipped, used + batch_samples(batch))

    def reset(self, split: str) -> None:
        self._totals.pop(split, None)
        self._pending.pop(split, None)

    def sync(self) -> None:
        """Fold every rank's pending counts into the totals. A collective: call it on every rank."""
        local = {split: (dict(c), n) for split, (c, n) in self._pending.items()}
        self._pending = {}
        parts = [local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        for part in parts:
            for split, (counts, n) in part.items():
                total, used = self._totals.setdefault(split, (Counter(), 0))
                total.update(counts)
                self._totals[split] = (total, used + n)

    # ---- reading -----------------------------------------------------------------------------
    def record(self, split: str) -> dict[str, Any] | None:
        """``{"reasons": {reason: n}, "total", "used", "fraction"}`` of the synced totals, or None."""
        if split not in self._totals:
            return None
        counts, used = self._totals[split]
        total = sum(counts.values())
        return {
            "reasons": dict(sorted(counts.items())),
            "total": total,
            "used": used,
            "fraction": total / (total + used) if total + used else 0.0,
        }

    def records(self) -> dict[str, dict[str, Any]]:
        """Every split that has counts, as :meth:`record` gives them."""
        return {split: self.record(split) for split in SPLITS if split in self._totals}

    def metrics(self, split: str) -> dict[str, float]:
        """``{"skipped/<split>/<reason>", .../total, .../used, .../fraction}`` (empty: no counts)."""
        rec = self.record(split)
        if rec is None:
            return {}
        # A reason spelt like a summary key would overwrite it; such a reason keeps a prefix.
        out = {
            f"skipped/{split}/{'reason_' * (r in _SUMMARY_KEYS)}{r}": float(n)
            for r, n in rec["reasons"].items()
        }
        out.update({f"skipped/{split}/{k}": float(rec[k]) for k in _SUMMARY_KEYS})
        return out

    def describe(self, split: str) -> str:
        """``"train: 9 of 30 samples skipped (30.0 %): bad_flac 5, bad_json 4"``."""
        rec = self.record(split)
        if rec is None:
            return f"{split}: no skip counts"
        reasons = ", ".join(f"{r} {n}" for r, n in rec["reasons"].items()) or "none"
        return (
            f"{split}: {rec['total']} of {rec['total'] + rec['used']} samples skipped "
            f"({100 * rec['fraction']:.1f} %): {reasons}"
        )

    # ---- checkpoints: the fit's train counts, so a resumed fit goes on counting ---------------
    # A checkpoint written between syncs (``ModelCheckpoint(every_n_train_steps=...)``) also holds
    # the saving rank's train counts since the last sync; a resume gives them back to global rank 0
    # only, so on one rank the resumed counts are exact, and on N ranks the other ranks' counts
    # since the last sync (at most one epoch or validation interval) are not recounted.
    def state_dict(self) -> dict[str, Any]:
        rec = self.record("train")
        state: dict[str, Any] = {"train": {"reasons": rec["reasons"], "used": rec["used"]}} if rec else {}
        if "train" in self._pending:
            counts, used = self._pending["train"]
            state["pending_train"] = {"reasons": dict(counts), "used": used}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        train = state_dict.get("train")
        if train is not None:
            self._totals["train"] = (
                Counter({str(k): int(v) for k, v in train["reasons"].items()}),
                int(train["used"]),
            )
        self._restored_pending = state_dict.get("pending_train")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored, self._restored_pending = getattr(self, "_restored_pending", None), None
        if restored and trainer.is_global_zero:
            counts, used = self._pending.setdefault("train", (Counter(), 0))
            counts.update({str(k): int(v) for k, v in restored["reasons"].items()})
            self._pending["train"] = (counts, used + int(restored["used"]))

    def load_checkpoint(self, path: str) -> bool:
        """Take the train counts of the fit that wrote checkpoint ``path``; False when it has none."""
        if "://" in str(path):  # a URL: Lightning fetches it; the counts are not read from afar
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:  # not loadable as plain data: counts unknown
            log.warning("cannot read skip counts from %s: %s", path, exc)
            return False
        state = (ckpt.get("callbacks") or {}).get(self.state_key)
        if not state:
            return False
        self.load_state_dict(state)
        return True

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.add("train", batch)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.reset("val")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:  # the sanity batches are read again by the real validation
            self.add("val", batch)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.reset("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.add("test", batch)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.reset("predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.add("predict", batch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sync()
        self._log(pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:  # every rank skips the sync alike
            return
        self.sync()  # also folds this epoch's train counts in, so checkpoints saved now hold them
        self._log(pl_module, "val")
        self._warn(trainer, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sync()
        self._log(pl_module, "test")
        self._warn(trainer, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sync()
        metrics = self.metrics("predict")
        if trainer.is_global_zero and metrics:  # self.log is not allowed in predict
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._warn(trainer, "predict")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._warn(trainer, "train")

    def _log(self, pl_module: LightningModule, split: str) -> None:
        # The values are the same on every rank already; sync_dist with max only keeps Lightning
        # from warning that an epoch-level value was not synced (every rank logs the same keys).
        for name, value in self.metrics(split).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    def _warn(self, trainer: Trainer, split: str) -> None:
        rec = self.record(split)
        if trainer.is_global_zero and rec and rec["total"]:
            log.warning("skipped samples in %s", self.describe(split))


def skip_tally(trainer: Trainer) -> SkipTally | None:
    """The trainer's :class:`SkipTally`, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, SkipTally)), None)


def with_skip_tally(trainer: Trainer) -> Trainer:
    """Give ``trainer`` a :class:`SkipTally` unless its callbacks have one (a config may name it).

    Put first: Lightning runs checkpoint callbacks last, so a checkpoint written at an epoch end
    already holds that epoch's counts.
    """
    if skip_tally(trainer) is None:
        trainer.callbacks.insert(0, SkipTally())
    return trainer


def explain_skips(message: str, tally: SkipTally | None) -> str:
    """A gate failure ``message`` plus the skip counts of each split whose skip gate it names."""
    lines = [message]
    for split in SPLITS:
        if f"skipped/{split}/" in message:
            rec = tally.record(split) if tally is not None else None
            lines.append(
                f"  skipped samples in {tally.describe(split)}"
                if rec
                else f"  no skip counts for {split} (a checkpoint written before stages.skips.SkipTally?)"
            )
    return "\n".join(lines)
