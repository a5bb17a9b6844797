"""Weighted shard sources (``datamodules/sources.py``) through ``SpeechDataModule``.

Corpora with distinct key prefixes let a batch's keys be counted per corpus: an exact epoch uses each
sample of a weight-``w`` corpus ``floor(w)`` times plus once more for a seeded, per-epoch subset of
``round(frac(w) * N)`` samples, on 1 rank and across ranks (a real 2-rank gloo fit through
``ddp_run.py``, and the LightningCLI); resampled draws match the weights' shares; corpora that share
shard names and sample keys still join their own token shards.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from datamodules.pipeline import BatchSpec
from datamodules.shard_dataset import ShardDataset
from datamodules.shards import ShardWriter, iter_tar_samples, resolve_shards
from datamodules.sources import epoch_views, parse_sources, repeat_count
from datamodules.speech import SpeechDataModule

HERE = Path(__file__).resolve().parent
SR = 16000
TIMEOUT = 240

_spec = importlib.util.spec_from_file_location("pipeline_test_helpers", HERE / "test_pipeline.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

# name: (samples per shard, weight); every shard its own tar, keys "<name>NNN".
CORPORA = {"fin": ((5, 4), 2), "bible": ((6,), 0.5), "news": ((3, 3), 1.5), "off": ((2,), 0)}


def make_corpus(root: Path, name: str, counts, seed: int) -> list[str]:
    """Shards of ``counts`` samples with keys ``<name>NNN`` and varied durations."""
    rng, keys = random.Random(seed), []
    with ShardWriter(root, prefix="train", max_samples=10**6) as writer:
        for count in counts:
            for _ in range(count):
                key, dur = f"{name}{len(keys):03d}", round(rng.uniform(0.05, 0.4), 3)
                meta = {"text": key, "language": "tw", "speaker": name, "duration": dur, "source": name}
                writer.write(
                    {"__key__": key, "flac": helpers.flac_bytes(dur, seed * 100 + len(keys)), "json": meta}
                )
                keys.append(key)
            writer._close_shard()
    return keys


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for i, (name, (counts, weight)) in enumerate(CORPORA.items()):
        out[name] = (str(root / name), make_corpus(root / name, name, counts, seed=i + 1), weight)
    return out


def weighted(corpora) -> list[dict]:
    return [{"shards": path, "weight": weight} for path, _, weight in corpora.values()]


def counted(batches) -> Counter:
    return Counter(k for b in batches for k, w in zip(b["keys"], b["sample_weight"].tolist()) if w > 0)


def assert_weighted_counts(count: Counter, corpora) -> dict[str, frozenset]:
    """Each key's count is its repeat count; returns each fractional corpus's extra subset."""
    extras = {}
    for name, (_, keys, weight) in corpora.items():
        whole, frac = math.floor(weight), weight - math.floor(weight)
        got = Counter(count[k] for k in keys)
        n_extra = math.floor(frac * len(keys) + 0.5)
        # Exactly n_extra keys once more than floor(w), the others floor(w) times, none more often.
        assert +got == +Counter({whole + 1: n_extra, whole: len(keys) - n_extra}), (name, got)
        extras[name] = frozenset(k for k in keys if count[k] == whole + 1)
    assert set(count) <= {k for _, keys, _ in corpora.values() for k in keys}
    return extras


def datamodule(train_shards, **kw) -> SpeechDataModule:
    kw = {"max_batch_seconds": 0.9, "max_batch_size": 3, "shuffle_buffer": 4, "seed": 7, **kw}
    return SpeechDataModule(train_shards=train_shards, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epoch_counts_follow_weights_on_one_rank(corpora, workers):
    dm = datamodule(weighted(corpora), num_workers=workers)
    dm.setup("fit")
    subsets = []
    for epoch in range(4):
        dm.datasets["train"].set_epoch(epoch)
        batches = list(dm.train_dataloader())
        assert len(batches) == dm.batches_per_epoch()
        subsets.append(assert_weighted_counts(counted(batches), corpora))
    # The fractional part draws a new subset every epoch, and the same one for the same epoch.
    assert len({s["bible"] for s in subsets}) > 1 and len({s["news"] for s in subsets}) > 1
    dm.datasets["train"].set_epoch(2)
    assert assert_weighted_counts(counted(dm.train_dataloader()), corpora) == subsets[2]


@pytest.mark.parametrize("world,workers", [(2, 1), (3, 2)])
def test_exact_epoch_counts_follow_weights_across_ranks(corpora, world, workers):
    indexes = [resolve_shards(path) for path, _, _ in corpora.values()]
    weights = [w for _, _, w in corpora.values()]
    total, per_rank = Counter(), []
    for rank in range(world):
        spec = BatchSpec(max_batch_seconds=0.9, max_batch_size=3)
        ds = ShardDataset(index=indexes, weights=weights, spec=spec, seed=3)
        ds.set_distributed(rank=rank, world_size=world, num_workers=workers)
        batches = list(DataLoader(ds, batch_size=None, num_workers=workers))
        per_rank.append(len(batches))
        total += counted(batches)
        assert all(b["pad"] == (b["sample_weight"].sum().item() == 0) for b in batches)
    assert len(set(per_rank)) == 1, per_rank
    assert_weighted_counts(total, corpora)


def test_trainer_ddp_two_ranks_weighted_exact(corpora, tmp_path, free_port, offline_env):
    """A real 2-rank gloo fit: equal batch counts per rank, every sample counted its repeat count."""
    cmd = [
        sys.executable, str(HERE / "ddp_run.py"), "--shards", corpora["fin"][0], "--out", str(tmp_path),
        "--train-shards", json.dumps(weighted(corpora)), "--modes", "exact", "--devices", "2",
        "--num-workers", "1",
    ]  # fmt: skip
    env = offline_env(drop=("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"), PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"exact-rank{r}.json").read_text())["seen"]["train"] for r in range(2)]
    subsets = []
    for epoch in ("0", "1"):
        assert len({len(r[epoch]) for r in ranks}) == 1, [len(r[epoch]) for r in ranks]
        count = Counter(k for r in ranks for batch in r[epoch] for k, w in batch if w > 0)
        subsets.append(assert_weighted_counts(count, corpora))
        for batch in (b for r in ranks for b in r[epoch]):
            assert all(w > 0 for _, w in batch) or (len(batch) == 1 and batch[0][1] == 0)
    assert subsets[0] != subsets[1], "the fractional subsets did not change with the epoch"


def test_resampled_shares_follow_weights(tmp_path):
    # Many small shards keep the draw's variance low; unweighted, "small" would get 1/3, not 0.6.
    big = make_corpus(tmp_path / "big", "big", (2,) * 8, seed=1)
    small = make_corpus(tmp_path / "small", "small", (2,) * 4, seed=2)
    dm = datamodule(
        [{"shards": str(tmp_path / "big"), "weight": 1}, {"shards": str(tmp_path / "small"), "weight": 3}],
        epoch_mode="resampled",
        epoch_batches=150,
        max_batch_size=2,
    )
    dm.setup("fit")
    count = counted(dm.train_dataloader())
    share = sum(count[k] for k in small) / (sum(count[k] for k in small) + sum(count[k] for k in big))
    sources = dm.describe_data()["sources"]
    expected = sources[1]["epoch_samples"] / sum(s["epoch_samples"] for s in sources)
    assert expected == pytest.approx(0.6) and share == pytest.approx(expected, abs=0.08), share


def test_plain_list_of_folders_is_every_sample_once(corpora):
    names = ("fin", "bible")
    dm = datamodule([corpora[n][0] for n in names])
    dm.setup("fit")
    assert counted(dm.train_dataloader()) == Counter(k for n in names for k in corpora[n][1])
    data = dm.describe_data()
    assert [(s["shards"], s["weight"]) for s in data["sources"]] == [(corpora[n][0], 1.0) for n in names]
    assert data["samples"] == sum(len(corpora[n][1]) for n in names) and {
        s["source"] for s in data["shards"]
    } == {0, 1}


def test_weight_one_sources_plan_as_one_source(corpora):
    """A list of tars (one source each) and the folder they are in give the same batches, in order."""
    folder = corpora["fin"][0]
    tars = resolve_shards(folder).paths()

    def order(spec):
        dm = datamodule(spec)
        dm.setup("fit")
        return [b["keys"] for b in dm.train_dataloader()]

    assert order(folder) == order(tars) == order([{"shards": t, "weight": 1} for t in tars])


def test_describe_data_records_each_source_with_its_weight(corpora):
    data = datamodule(weighted(corpora)).describe_data()
    assert [(s["shards"], s["weight"]) for s in data["sources"]] == [
        (p, float(w)) for p, _, w in corpora.values()
    ]
    assert [s["epoch_samples"] for s in data["sources"]] == [18, 3, 9, 0]
    assert data["spec"] == [{"shards": p, "weight": float(w)} for p, _, w in corpora.values()]


def test_provenance_content_hash_sees_the_weights(corpora):
    from stages.promote import _data_provenance

    fin, bible = corpora["fin"][0], corpora["bible"][0]
    plain = _data_provenance(datamodule([fin, bible]))
    reweighted = _data_provenance(datamodule([{"shards": fin, "weight": 2}, bible]))
    assert plain["shards"] == reweighted["shards"] and plain["content_hash"] != reweighted["content_hash"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ([{"shards": "a", "weight": -1}], "finite and >= 0"),
        ([{"shards": "a", "weight": float("nan")}], "finite and >= 0"),
        ([{"shards": "a", "weight": float("inf")}], "finite and >= 0"),
        ([{"shards": "a", "weight": "3"}], "must be a number"),
        ([{"shards": "a", "weight": True}], "must be a number"),
        ([{"shards": "a", "weight": 0}, {"shards": "b", "weight": 0.0}], "every weight is zero"),
        ([{"shards": "a", "weigth": 2}], "needs 'shards'"),
        ([], "non-empty list"),
        ([3], "must be a string"),
    ],
)
def test_invalid_weights_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        datamodule(spec)
    with pytest.raises(ValueError, match=match):
        parse_sources(spec)


def test_weights_on_evaluation_splits_are_refused(corpora):
    with pytest.raises(ValueError, match="training only"):
        datamodule(corpora["fin"][0], val_shards=[{"shards": corpora["bible"][0], "weight": 2}])
    with pytest.raises(ValueError, match=r"weights\[0\]: weight must be finite"):
        ShardDataset(index=[resolve_shards(corpora["fin"][0])], weights=[-1.0])
    dm = datamodule(corpora["fin"][0], val_shards=[corpora["fin"][0], corpora["bible"][0]])
    dm.setup("validate")
    assert counted(dm.val_dataloader()) == Counter(corpora["fin"][1] + corpora["bible"][1])


def test_epoch_views_repeat_and_subsample_per_sample():
    views = epoch_views([4, 6, 5], [0, 0, 1], [2.5, 1.0], seed=0, epoch=0)
    full = [(v.shard, v.copy) for v in views if v.positions is None]
    assert full == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0)]
    extra = [(v.shard, p) for v in views if v.positions is not None for p in v.positions]
    assert len(extra) == 5 and len(set(extra)) == 5 and all(s in (0, 1) for s, _ in extra)
    # floor(w) * N + round(frac(w) * N), half up.
    assert [repeat_count(w, n) for w, n in ((1 / 3, 4), (2.5, 3), (0.5, 1), (0, 5))] == [1, 8, 1, 0]
    assert epoch_views([4, 6], [0, 1], [1, 1], seed=0, epoch=3) == epoch_views(
        [4, 6], [0, 0], [1], seed=9, epoch=0
    )


def test_colliding_keys_and_shard_names_join_their_own_tokens(tmp_path):
    """Two corpora with the same shard names and keys: each joins its own token shards."""
    specs, tokens = [], []
    for i, name in enumerate(("a", "b")):
        helpers.make_speech(tmp_path / name, counts=(3, 4), seed=10 + i)  # keys utt0000.. in both
        helpers.make_tokens(tmp_path / f"{name}_tok", tmp_path / name)
        specs.append({"shards": str(tmp_path / name), "weight": 2 - i})
        tokens.append(str(tmp_path / f"{name}_tok"))
    dm = datamodule(specs, token_shards={"train": tokens}, fields="both")
    dm.setup("fit")
    seen = Counter()
    for b in dm.train_dataloader():
        for i, meta in enumerate(b["meta"]):
            # The token json carries the duration of the speech it mirrors: it must be this audio's.
            assert abs(b["audio_lengths"][i].item() - meta["duration"] * SR) <= 1, (b["keys"][i], meta)
            assert b["code_lengths"][i].item() == meta["n_frames"]
            if b["sample_weight"][i] > 0:
                seen[(b["keys"][i], meta["duration"])] += 1
    durations = {
        name: [json.loads(raw["json"])["duration"] for p in resolve_shards(str(tmp_path / name)).paths()
               for raw in iter_tar_samples(p)]
        for name in ("a", "b")
    }  # fmt: skip
    keys = [f"utt{n:04d}" for n in range(7)]
    assert seen == Counter(
        {
            **{(k, d): 2 for k, d in zip(keys, durations["a"])},
            **{(k, d): 1 for k, d in zip(keys, durations["b"])},
        }
    )
    with pytest.raises(ValueError, match="one token source per speech source"):
        datamodule(specs, token_shards={"train": tokens[:1] * 3}, fields="both").setup("fit")


def test_lightning_cli_accepts_weighted_sources(corpora, tmp_path, monkeypatch, capsys):
    """``--print_config`` and a real ``fit`` through the project's LightningCLI take the YAML list."""
    from stages.cli import main as cli

    monkeypatch.syspath_prepend(str(HERE))  # ddp_run.Recorder: a model that records its batches
    torch.set_num_threads(1)
    train = [
        {"shards": corpora["fin"][0], "weight": 2},
        corpora["bible"][0],
        {"shards": corpora["news"][0], "weight": 1.5},
    ]
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "ddp_run.Recorder", "init_args": {"out": str(tmp_path), "tag": "cli"}},
        "data": {"class_path": "datamodules.speech.SpeechDataModule",
                 "init_args": {"train_shards": train, "max_batch_seconds": 0.9, "max_batch_size": 3}},
    }  # fmt: skip
    path = tmp_path / "weighted.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["train_shards"] == train
    cli(["fit", "--config", str(path)])
    seen = json.loads((tmp_path / "cli-rank0.json").read_text())["seen"]["train"]["0"]
    count = Counter(k for batch in seen for k, w in batch if w > 0)
    expect = {n: corpora[n] for n in ("fin", "bible", "news")}
    expect["bible"] = (*corpora["bible"][:2], 1)
    assert_weighted_counts(count, expect)
