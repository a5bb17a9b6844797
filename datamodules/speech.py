"""The speech datamodule: one WebDataset pipeline for stage 1 (audio), stage 2 (tokens [+ audio]) and 3.

Follows the shard contract of ``datamodules/shards.py`` and ``../shared/DESIGN.md``; the stages are
those of ``datamodules/pipeline.py``. Token shards are joined with the speech shards they were made
from on ``__key__`` (as WhisperSpeech joins its derived shards), and the per-sample transform and the
collate function are bound late (:meth:`SpeechDataModule.bind`) so a stage module can attach its
tokenizer after the datamodule is built.

DDP: Lightning does not inject a ``DistributedSampler`` for an ``IterableDataset``; instead the
datamodule stores the rank and world size on each dataset in the main process, before the
DataLoader forks its workers, and sets the epoch on the dataset each time the loader is iterated
(workers are not persistent, so every epoch's workers see the new epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from datamodules.pipeline import BatchSpec
from datamodules.ranks import trainer_rank
from datamodules.resume import fit_position, skip_batches
from datamodules.shard_dataset import Fields, ShardDataset
from datamodules.sources import ShardSpec, describe_sources, parse_sources, resolve_sources

__all__ = ["SpeechDataModule"]

SPLITS = ("train", "val", "test", "predict")


class _EpochLoader(DataLoader):
    """A DataLoader that sets the dataset's epoch each time it is iterated (before workers start).

    ``position_fn() -> (epoch, batches_done)`` (see :func:`datamodules.resume.fit_position`): a fit
    resumed inside an epoch reads that epoch and drops the batches it had already trained.
    """

    def __init__(self, dataset, *args, position_fn: Callable[[], tuple[int, int]] | None = None, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.position_fn = position_fn

    def __iter__(self):
        skip = 0
        if self.position_fn is not None and hasattr(self.dataset, "set_epoch"):
            epoch, skip = self.position_fn()
            self.dataset.set_epoch(epoch)
        return skip_batches(super().__iter__(), skip)


class SpeechDataModule(L.LightningDataModule):
    """Speech (and token) shards for every stage, with exact-once or resampled DDP epochs.

    Batches are dicts: ``audio`` ``[B, N]`` float32 + ``audio_lengths`` ``[B]`` (``fields`` audio or
    both), ``codes`` ``[B, Q, T]`` long padded with ``pad_id`` + ``code_lengths`` ``[B]`` (tokens or
    both), ``sample_weight`` ``[B]`` (0 on padding samples: weight losses and metrics by it),
    ``keys``, ``meta`` (the json dicts), ``pad`` (a padding batch) and ``skipped`` (corrupt samples
    skipped since this worker's previous batch, by reason: sum them for totals).

    Args:
        train_shards, val_shards, test_shards, predict_shards: an index file or folder, a glob, a
            brace pattern or a list of tars (see ``resolve_shards``); or several sources, a list of
            such strings (weight 1 each) or of ``{"shards": ..., "weight": w}`` (see
            ``datamodules/sources.py``). Training epochs use each sample of a source ``w`` times
            (``exact``: fractions subsample, seeded per epoch) or draw sources by ``w`` times their
            samples (``resampled``). Evaluation reads every sample of every source once, so weights
            other than 1 are refused there; the prediction writers refuse a key seen twice, so the
            sources of ``predict_shards`` must not share keys. Token shards when ``fields="tokens"``
            and ``token_shards`` has no entry for the split.
        token_shards: split name (``train``/``val``/``test``/``predict``) to token shards mirroring
            that split's speech shards (same basenames, same sample order): one entry per source, in
            the same order, or one for all; without weights (see ``sources.resolve_sources``).
        fields: what batches carry: ``"audio"``, ``"tokens"`` or ``"both"`` (joined on ``__key__``).
        epoch_mode: training epochs ``"exact"`` (each sample once, or as its source's weight says)
            or ``"resampled"`` (``epoch_batches`` per rank). Validation, test and predict are always
            exact, unshuffled.
        epoch_batches: batches per rank per training epoch in resampled mode.
        max_batch_seconds: cap on a batch's padded audio seconds.
        max_batch_size: cap on samples per batch.
        bucket_boundaries: length bucket edges in seconds.
        shuffle_buffer: in-stream shuffle buffer (training only).
        seed: shuffling seed.
        num_workers: DataLoader workers per rank.
        sample_rate: expected audio rate in Hz.
        frame_rate: token frames per second.
        pad_id: padding value of ``codes``.
        pin_memory: DataLoader ``pin_memory``.
    """

    def __init__(
        self,
        *,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        predict_shards: ShardSpec | None = None,
        token_shards: Mapping[str, ShardSpec] | None = None,
        fields: Fields = "audio",
        epoch_mode: Literal["exact", "resampled"] = "exact",
        epoch_batches: int | None = None,
        max_batch_seconds: float = 120.0,
        max_batch_size: int = 64,
        bucket_boundaries: list[float] | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        num_workers: int = 0,
        sample_rate: int = 16000,
        frame_rate: float = 25.0,
        pad_id: int = -1,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        unknown = set(token_shards or {}) - set(SPLITS)
        if unknown:
            raise ValueError(f"token_shards keys must be among {SPLITS}, got {sorted(unknown)}")
        if epoch_mode == "resampled" and not epoch_batches:
            raise ValueError("epoch_mode='resampled' needs epoch_batches")
        self.shards = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards,
        }
        self.token_shards = dict(token_shards or {})
        for split, spec in self.shards.items():  # fail at construction, not after the first epoch
            if spec is None:
                continue
            weights = [s.weight for s in parse_sources(spec, name=f"{split}_shards")]
            if split != "train" and any(w != 1 for w in weights):
                raise ValueError(
                    f"{split}_shards: weights apply to training only; evaluation reads every sample once"
                )
        for split, spec in self.token_shards.items():
            if any(s.weight != 1 for s in parse_sources(spec, name=f"token_shards[{split!r}]")):
                raise ValueError(f"token_shards[{split!r}]: weights belong on {split}_shards")
        self.fields, self.epoch_mode, self.epoch_batches = fields, epoch_mode, epoch_batches
        self.spec = BatchSpec(
            max_batch_seconds=max_batch_seconds,
            max_batch_size=max_batch_size,
            bucket_boundaries=tuple(bucket_boundaries or ()),
        )
        self.buffer, self.seed, self.num_workers = shuffle_buffer, seed, num_workers
        self.sample_rate, self.frame_rate, self.pad_id, self.pin_memory = (
            sample_rate,
            frame_rate,
            pad_id,
            pin_memory,
        )
        self.transform: Callable | None = None
        self.collate: Callable | None = None
        self.datasets: dict[str, ShardDataset] = {}
        self._epoch = 0

    def bind(self, transform: Callable | None = None, collate: Callable | None = None) -> SpeechDataModule:
        """Attach a per-sample transform and a collate function (e.g. a stage's tokenizer).

        Both are replaced on every call (``None`` restores the default), also on datasets already
        built.

        ``transform(sample) -> sample | None`` runs in the workers on each decoded sample (None
        skips it, counted as ``transform_rejected``; raising ``SampleError(reason)`` skips it,
        counted under ``reason``); ``collate(samples) -> batch`` replaces
        :func:`~datamodules.pipeline.collate_samples` and receives ``sample_weight`` per sample.
        Must be picklable when ``num_workers > 0`` with a spawn start method.
        """
        self.transform, self.collate = transform, collate
        for ds in self.datasets.values():
            ds.transform, ds.collate = transform, collate
        return self

    def _make(self, split: str) -> ShardDataset:
        if self.fields == "both" and self.token_shards.get(split) is None:
            raise ValueError(f"fields='both' needs token_shards[{split!r}]")
        indexes, tokens, weights = resolve_sources(
            self.shards[split],
            self.token_shards.get(split),
            name=f"{split}_shards",
            tokens_only=self.fields == "tokens",
        )
        if len(indexes) == 1 and weights == [1.0]:  # one source: exactly the single-source dataset
            indexes, tokens, weights = indexes[0], tokens[0] if tokens else None, None
        train = split == "train"
        ds = ShardDataset(
            index=indexes,
            token_index=tokens,
            weights=weights,
            fields=self.fields,
            mode=self.epoch_mode if train else "exact",
            spec=self.spec,
            epoch_batches=self.epoch_batches if train else None,
            shuffle=train,
            buffer=self.buffer if train else 0,
            seed=self.seed,
            sample_rate=self.sample_rate,
            frame_rate=self.frame_rate,
            pad_id=self.pad_id,
        )
        ds.transform, ds.collate = self.transform, self.collate
        if train:
            ds.set_epoch(self._epoch)
        return ds

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in splits.get(stage, SPLITS):
            if self.shards[split] is not None and split not in self.datasets:
                self.datasets[split] = self._make(split)
        self._bind_distributed()

    def _bind_distributed(self) -> None:
        rank, world = trainer_rank(self.trainer)
        for ds in self.datasets.values():
            ds.set_distributed(rank=rank, world_size=world, num_workers=self.num_workers)

    def _current_epoch(self) -> int:
        return self._position()[0]

    def _position(self) -> tuple[int, int]:
        """The training epoch to read and its batches already trained (a resumed fit skips them)."""
        if self.trainer is None:
            return self.datasets["train"].epoch, 0
        return fit_position(self.trainer)

    def _loader(self, split: str) -> DataLoader | list:
        if self.shards[split] is None:
            return []
        if split not in self.datasets:
            self.setup(None)
        self._bind_distributed()
        return _EpochLoader(
            self.datasets[split],
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,  # the epoch reaches workers only when they are re-created
            pin_memory=self.pin_memory,
            position_fn=self._position if split == "train" else None,
        )

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")

    def describe_data(self, split: str = "train") -> dict[str, Any]:
        """What a split holds, for provenance: shard urls, sample counts, seconds and hashes.

        With a list of sources, also ``sources``: each source's ``shards``, ``weight``, ``samples``,
        ``seconds`` and ``epoch_samples`` (what one exact epoch uses), and each shard's ``source``.
        """
        spec = self.shards.get(split)
        if spec is None:
            return {}
        return describe_sources(spec, split=split)

    def batches_per_epoch(self, split: str = "train") -> int:
        """Batches each rank runs in the current epoch of ``split`` (e.g. to size an LR schedule).

        The loaders define no ``__len__`` (an exact epoch's count changes with the shuffle), so
        Lightning iterates them to the end; this gives the count when a module needs it.
        """
        if split not in self.datasets:
            raise ValueError(f"no {split!r} dataset; call setup() and give {split}_shards")
        if split == "train":
            self.datasets[split].set_epoch(self._current_epoch())
        return self.datasets[split].num_batches()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.datasets["train"].epoch if "train" in self.datasets else self._epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", 0))
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(self._epoch)
