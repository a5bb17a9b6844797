"""Where in the data a (resumed) fit stands: the epoch to read and the batches of it already trained.

Lightning restores its loop counters from ``--ckpt_path`` before it makes the training loader, but
``trainer.current_epoch`` then says where the checkpoint was written, not what comes next:

- a checkpoint written at the end of epoch ``e`` (``ModelCheckpoint`` after validation) holds
  ``current_epoch == e`` with every batch of ``e`` processed; the loader Lightning makes next serves
  epoch ``e + 1``, so reading epoch ``e``'s order again (what a loader that trusts
  ``current_epoch`` does) replays the previous epoch;
- a checkpoint written every N steps (``ModelCheckpoint(every_n_train_steps=N)``) holds the number
  of batches of the current epoch already trained; the loader must start after them, not at the
  epoch's first batch.

:func:`fit_position` reads both from the restored loop state, so the datamodules can serve exactly
the batches the uninterrupted run would have served next (a restart inside an epoch reads the
skipped batches and drops them before the model sees them: the order after them is exact, at the
cost of reading them once more). Each rank reads the same restored state,
so the ranks agree without a collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

__all__ = ["fit_position", "skip_batches"]


def fit_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches_done)``: the training epoch to read and how many of its batches to skip.

    The epoch is Lightning's own ``epoch_progress.current.processed`` (what it gives samplers'
    ``set_epoch``): the epoch in progress, or the next one when the last one has run all its
    batches. Batches are skipped only when the fit restarts inside an epoch (the epoch is started
    but not processed): then ``batch_progress.current.processed`` batches of it were trained.
    ``trainer`` None: epoch 0 from its start.
    """
    if trainer is None:
        return 0, 0
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:
        return int(trainer.current_epoch), 0
    epochs = fit_loop.epoch_progress.current
    epoch = int(epochs.processed)
    mid_epoch = epochs.started > epochs.processed
    return epoch, int(fit_loop.epoch_loop.batch_progress.current.processed) if mid_epoch else 0


def skip_batches(iterator: Iterator, n: int) -> Iterator:
    """``iterator`` without its first ``n`` items (read and dropped: the order after them is exact)."""
    return islice(iterator, n, None) if n else iterator
