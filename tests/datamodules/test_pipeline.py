"""Single-process tests of the shard pipeline and ``SpeechDataModule``: exact-once epochs, seeded
shuffling, seconds-capped batches, resampled epochs, corrupt-sample skips and token shards."""

from __future__ import annotations

import io
import json
import os
import random
from collections import Counter

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from datamodules.pipeline import BatchSpec, bucket_batches
from datamodules.ranks import plan_exact_epoch
from datamodules.shard_dataset import ShardDataset
from datamodules.shards import ShardWriter
from datamodules.speech import SpeechDataModule

SR = 16000


def flac_bytes(seconds: float, seed: int = 0) -> bytes:
    audio = np.random.default_rng(seed).uniform(-0.5, 0.5, int(round(seconds * SR))).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, audio, SR, format="FLAC")
    return buf.getvalue()


def make_speech(root, counts=(7, 3, 11), *, seed=0, prefix="train", corrupt=None):
    """Write shards of ``counts`` samples with varied durations; ``corrupt`` maps key -> kind."""
    rng = random.Random(seed)
    corrupt = corrupt or {}
    keys, n = [], 0
    with ShardWriter(root, prefix=prefix, max_samples=10**6) as writer:
        for count in counts:
            for _ in range(count):
                key = f"utt{n:04d}"
                dur = round(rng.uniform(0.05, 0.6), 3)
                meta = {
                    "text": f"t{n}",
                    "language": "tw",
                    "speaker": f"s{n % 3}",
                    "duration": dur,
                    "source": "test",
                }
                sample = {"__key__": key, "flac": flac_bytes(dur, n), "json": meta}
                kind = corrupt.get(key)
                if kind == "flac":
                    sample["flac"] = b"not a flac at all"
                elif kind == "json":
                    sample["json"] = b"{broken"
                elif kind == "missing":
                    del sample["flac"]
                writer.write(sample, seconds=dur)
                keys.append(key)
                n += 1
            writer._close_shard()  # one shard per entry of ``counts`` (the writer caps only by size)
    return keys


def make_tokens(root, speech_root, *, q=3, prefix="train", rename=None):
    """Token shards mirroring the speech shards in ``speech_root`` (same basenames and order)."""
    from datamodules.shards import iter_tar_samples, read_index

    index = read_index(speech_root)
    with ShardWriter(root, prefix=prefix, max_samples=10**6, kind="tokens") as writer:
        for path in index.paths():
            for raw in iter_tar_samples(path):
                meta = json.loads(raw["json"])
                t = max(1, int(meta["duration"] * 25))
                codes = np.arange(q * t, dtype=np.int64).reshape(q, t) % 2048
                key = (rename or {}).get(raw["__key__"], raw["__key__"])
                writer.write({"__key__": key, "json": {**meta, "n_frames": t}, "codes.npy": codes})
            writer._close_shard()


def collect(loader):
    batches = list(loader)
    counted = [k for b in batches for k, w in zip(b["keys"], b["sample_weight"].tolist()) if w > 0]
    return batches, counted


def dataset(root, **kw):
    from datamodules.shards import resolve_shards

    kw.setdefault("spec", BatchSpec(max_batch_seconds=1.0, max_batch_size=4))
    return ShardDataset(index=resolve_shards(str(root)), **kw)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    return root, make_speech(root)


def test_bucket_batches_caps_seconds_and_size_and_keeps_everything():
    rng = random.Random(1)
    items = [rng.uniform(0.1, 3.0) for _ in range(200)]
    spec = BatchSpec(max_batch_seconds=6.0, max_batch_size=5, bucket_boundaries=(1.0, 2.0))
    batches = list(bucket_batches(items, lambda x: x, spec))
    assert sorted(x for b in batches for x in b) == sorted(items)
    for b in batches:
        assert len(b) <= 5 and len(b) * max(b) <= 6.0
        assert len({int(x >= 1.0) + int(x >= 2.0) for x in b}) == 1  # one bucket per batch
    # An over-long sample still gets a batch of its own.
    assert list(bucket_batches([10.0, 1.0], lambda x: x, spec)) == [[10.0], [1.0]]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2), (4, 4)])
def test_plan_covers_every_position_once_with_equal_rank_counts(world, workers):
    rng = random.Random(world * 10 + workers)
    durations = [[rng.uniform(0.1, 2.0) for _ in range(n)] for n in (7, 3, 11, 0, 5)]
    plan = plan_exact_epoch(
        durations,
        world_size=world,
        num_workers=workers,
        spec=BatchSpec(max_batch_seconds=3.0, max_batch_size=3),
        seed=3,
        epoch=1,
        buffer=4,
    )
    seen = Counter(pos for rank in plan.slots for slot in rank for b in slot.batches for pos in b)
    assert seen == Counter((s, p) for s, d in enumerate(durations) for p in range(len(d)))
    assert {sum(s.num_batches for s in rank) for rank in plan.slots} == {plan.batches_per_rank}
    if world * workers <= sum(map(len, durations)):
        # Shards are split by sample when there are fewer than slots: no rank is left without data.
        assert all(any(slot.batches for slot in rank) for rank in plan.slots)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_exact_epoch_sees_every_key_once(speech, workers):
    root, keys = speech
    ds = dataset(root, buffer=4, seed=5)
    ds.set_distributed(rank=0, world_size=1, num_workers=workers)
    batches, counted = collect(DataLoader(ds, batch_size=None, num_workers=workers))
    assert sorted(counted) == sorted(keys)
    assert len(batches) == ds.num_batches()
    for b in batches:
        assert b["audio"].dtype == torch.float32 and b["audio"].shape[0] == len(b["keys"])
        assert b["audio_lengths"].max().item() == b["audio"].shape[1]
        # The cap holds on the decoded audio, not only on the index's durations.
        assert len(b["keys"]) <= 4 and b["audio_lengths"].max().item() * len(b["keys"]) <= 1.0 * SR + 1


def test_ranks_split_exactly_with_padding(speech):
    root, keys = speech
    counted, counts = [], []
    for rank in range(3):
        ds = dataset(root, spec=BatchSpec(max_batch_seconds=0.8, max_batch_size=2))
        ds.set_distributed(rank=rank, world_size=3, num_workers=1)
        batches, got = collect(DataLoader(ds, batch_size=None, num_workers=0 if rank else 0))
        counted += got
        counts.append(len(batches))
        for b in batches:
            assert b["pad"] == (b["sample_weight"].sum().item() == 0)
    assert sorted(counted) == sorted(keys) and len(set(counts)) == 1


def test_shuffle_is_seeded_and_changes_with_epoch(speech):
    root, _ = speech

    def order(seed, epoch):
        ds = dataset(root, seed=seed, buffer=8)
        ds.set_epoch(epoch)
        return collect(DataLoader(ds, batch_size=None))[1]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    ds = dataset(root, shuffle=False)
    assert collect(DataLoader(ds, batch_size=None))[1] == collect(DataLoader(ds, batch_size=None))[1]


def test_datamodule_sets_epoch_on_each_iteration(speech):
    root, keys = speech
    dm = SpeechDataModule(
        train_shards=str(root), max_batch_seconds=1.0, max_batch_size=4, seed=3, num_workers=1
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = collect(loader)[1]
    dm.datasets["train"].set_epoch(1)  # no trainer: the dataset's own epoch is used
    second = collect(loader)[1]
    assert sorted(first) == sorted(second) == sorted(keys) and first != second
    assert dm.state_dict() == {"epoch": 1}
    assert dm.batches_per_epoch() == len(list(loader))
    assert dm.val_dataloader() == []


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_yields_exactly_epoch_batches(speech, workers):
    root, keys = speech
    ds = dataset(root, mode="resampled", epoch_batches=7, buffer=4)
    ds.set_distributed(rank=0, world_size=1, num_workers=workers)
    batches, counted = collect(DataLoader(ds, batch_size=None, num_workers=workers))
    assert len(batches) == 7 and set(counted) <= set(keys)


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    corrupt = {"utt0002": "flac", "utt0008": "json", "utt0015": "missing"}
    keys = make_speech(tmp_path, corrupt=corrupt)
    ds = dataset(tmp_path, buffer=4)
    batches, counted = collect(DataLoader(ds, batch_size=None))
    assert sorted(counted) == sorted(set(keys) - set(corrupt))
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped == {"bad_flac": 1, "bad_json": 1, "missing_flac": 1}
    assert len(batches) == ds.num_batches()  # planned counts hold despite the skips


def test_truncated_shard_is_counted_and_batch_counts_hold(tmp_path):
    keys = make_speech(tmp_path, counts=(6, 6))
    path = tmp_path / "train-000001.tar"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    ds = dataset(tmp_path)
    batches, counted = collect(DataLoader(ds, batch_size=None))
    skipped = sum(sum(b["skipped"].values()) for b in batches)
    assert set(keys[:6]) <= set(counted) and len(counted) + skipped == 12 and skipped >= 3
    assert len(batches) == ds.num_batches()


def test_token_shards_collate_and_join_by_key(tmp_path):
    make_speech(tmp_path / "speech", counts=(4, 5))
    make_tokens(tmp_path / "tokens", tmp_path / "speech")
    dm = SpeechDataModule(
        train_shards=str(tmp_path / "speech"),
        token_shards={"train": str(tmp_path / "tokens")},
        fields="both",
        max_batch_seconds=1.0,
        max_batch_size=3,
    )
    dm.setup("fit")
    batches, counted = collect(dm.train_dataloader())
    assert len(counted) == 9
    for b in batches:
        B, Q, T = b["codes"].shape
        assert Q == 3 and b["codes"].dtype == torch.long and B == b["audio"].shape[0]
        assert T == b["code_lengths"].max().item()
        for i, n in enumerate(b["code_lengths"].tolist()):
            assert (b["codes"][i, :, n:] == -1).all() and (b["codes"][i, :, :n] >= 0).all()
            assert n == b["meta"][i]["n_frames"]

    only = SpeechDataModule(train_shards=str(tmp_path / "tokens"), fields="tokens", max_batch_seconds=1.0)
    only.setup("fit")
    batches, counted = collect(only.train_dataloader())
    assert len(counted) == 9 and "audio" not in batches[0] and batches[0]["codes"].ndim == 3


def test_token_key_mismatch_is_a_clear_error(tmp_path):
    make_speech(tmp_path / "speech", counts=(4,))
    make_tokens(tmp_path / "tokens", tmp_path / "speech", rename={"utt0002": "other"})
    dm = SpeechDataModule(
        train_shards=str(tmp_path / "speech"), token_shards={"train": str(tmp_path / "tokens")}, fields="both"
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match="key mismatch"):
        list(dm.train_dataloader())


def test_bind_attaches_transform_and_collate(speech):
    root, keys = speech
    dm = SpeechDataModule(train_shards=str(root), max_batch_seconds=1.0)
    dm.setup("fit")

    def transform(s):
        return None if s["__key__"] == "utt0000" else {**s, "text": s["meta"]["text"]}

    dm.bind(transform=transform)
    batches = list(dm.train_dataloader())
    assert sum(b["skipped"].get("transform_rejected", 0) for b in batches) == 1
    dm.bind(
        transform=transform,
        collate=lambda samples: {"texts": [(s["text"], s["sample_weight"]) for s in samples]},
    )
    texts = [t for b in dm.train_dataloader() for t, w in b["texts"] if w > 0]
    assert (
        len(texts) == len(keys) - 1 and "t0" not in texts and "skipped" in next(iter(dm.train_dataloader()))
    )


def test_worker_count_mismatch_is_an_error(speech):
    root, _ = speech
    ds = dataset(root)
    ds.set_distributed(rank=0, world_size=1, num_workers=0)
    with pytest.raises(RuntimeError, match="planned for 0"):
        list(DataLoader(ds, batch_size=None, num_workers=2))


def test_trainer_predict_and_validate_see_every_key_once(speech):
    import lightning as L

    class Keys(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.val_keys = []

        def predict_step(self, batch, batch_idx):
            return [k for k, w in zip(batch["keys"], batch["sample_weight"].tolist()) if w > 0]

        def validation_step(self, batch, batch_idx):
            self.val_keys += [k for k, w in zip(batch["keys"], batch["sample_weight"].tolist()) if w > 0]

    root, keys = speech
    dm = SpeechDataModule(
        val_shards=str(root), predict_shards=str(root), max_batch_seconds=1.0, num_workers=1
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    module = Keys()
    predicted = [k for batch in trainer.predict(module, datamodule=dm) for k in batch]
    trainer.validate(module, datamodule=dm, verbose=False)
    assert sorted(predicted) == sorted(module.val_keys) == sorted(keys)
