"""Stage 3's streamed data (``datamodules/instruction_stream.py``) with a trivial builder: no model.

Token shards of unequal length and a text JSONL; every rank of an exact epoch runs the same number of
batches and, over the ranks, every spoken row is trained once and the text rows as their weight says;
batches keep to the token budget and to their length bucket; workers build the examples; bad rows are
counted skips.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.instructions import InstructionDataModule
from datamodules.shards import ShardWriter

PROMPT = 10  # the datamodule's prompt_tokens in these tests: the estimate of a spoken row is PROMPT + frames


def build(*, instruction_text, codes, response):
    """Tokens: one per code frame (or instruction word), one per response word, and 3 of template."""
    n = (codes.shape[-1] if codes is not None else len(instruction_text.split())) + len(response.split()) + 3
    out = {"input_ids": torch.arange(n), "labels": torch.arange(n), "audio_positions": torch.zeros(n, dtype=torch.bool)}
    return {**out, "codes": codes} if codes is not None else out


def collate(examples):
    return {"keys": [e["__key__"] for e in examples], "lengths": [int(e["input_ids"].numel()) for e in examples],
            "sample_weight": torch.tensor([float(e["sample_weight"]) for e in examples])}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream3")
    rng = np.random.default_rng(0)
    frames = {}
    for name, counts in (("a", (7, 3, 11)), ("b", (5,))):
        with ShardWriter(root / name, prefix=name, max_samples=max(counts), kind="tokens") as writer:
            i = 0
            for count in counts:
                for _ in range(count):
                    n = int(rng.integers(4, 60))
                    key = f"{name}{i}"
                    frames[key] = n
                    codes = rng.integers(0, 16, size=(2, n)).astype(np.int16)
                    writer.write({"__key__": key, "json": {"instruction": f"say {i}", "response": "ok"}, "codes.npy": codes},
                                 seconds=n / 25)  # fmt: skip
                    i += 1
            writer._close_shard()
    with open(root / "text.jsonl", "w") as f:
        for i in range(9):
            f.write(json.dumps({"instruction": "word " * (i + 1), "response": "fine"}) + "\n" + ("\n" if i == 4 else ""))
    return {"a": root / "a", "b": root / "b", "text": root / "text.jsonl", "frames": frames}


def make(data, *, rank=0, world=1, epoch=0, **kwargs) -> InstructionDataModule:
    kwargs.setdefault("train_shards", str(data["a"]))
    dm = InstructionDataModule(prompt_tokens=PROMPT, shuffle_buffer=8, **kwargs)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    dm.bind(build_example=build, collate=collate)
    dm.setup("fit")
    return dm


def epoch_batches(data, *, world=1, epoch=0, **kwargs) -> list[list[dict]]:
    out = []
    for rank in range(world):
        loader = make(data, rank=rank, world=world, epoch=epoch, **kwargs).train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)  # Lightning sizes the epoch (and val_check_interval) by len()
        out.append(batches)
    return out


def used(batches) -> Counter:
    return Counter(k for b in batches for k, w in zip(b["keys"], b["sample_weight"]) if w > 0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_epoch_trains_every_row_once_with_equal_batch_counts(data, world):
    ranks = epoch_batches(data, world=world, batch_size=4, text_jsonl=str(data["text"]), text_ratio=0.5)
    assert len({len(r) for r in ranks}) == 1  # every rank runs as many batches (DDP never waits)
    seen = sum((used(r) for r in ranks), Counter())
    spoken = {k: n for k, n in seen.items() if not k.startswith("text-")}
    assert spoken == {f"a{i}": 1 for i in range(21)}
    assert sum(n for k, n in seen.items() if k.startswith("text-")) == round(0.5 * 21)  # 9 rows, 10 picks
    assert all(len(b["keys"]) <= 4 for r in ranks for b in r)
    pads = [b for r in ranks for b in r if not b["sample_weight"].any()]
    assert all(b["pad"] for b in pads) and (world > 1 or not pads)


def test_epochs_are_reproducible_and_differ_from_each_other(data):
    first = [b["keys"] for b in epoch_batches(data, batch_size=4)[0]]
    assert first == [b["keys"] for b in epoch_batches(data, batch_size=4)[0]]
    assert first != [b["keys"] for b in epoch_batches(data, batch_size=4, epoch=1)[0]]


def test_batches_keep_to_the_token_budget_and_their_bucket(data):
    budget, edges = 160, [30, 50]
    batches = epoch_batches(data, batch_size=64, max_batch_tokens=budget, bucket_boundaries=edges)[0]
    estimate = {k: PROMPT + n for k, n in data["frames"].items()}
    assert sorted(k for b in batches for k in b["keys"]) == sorted(f"a{i}" for i in range(21))
    for b in batches:
        lengths = [estimate[k] for k in b["keys"]]
        assert len(lengths) == 1 or len(lengths) * max(lengths) <= budget
        assert len({int(np.searchsorted(edges, n, side="right")) for n in lengths}) == 1
    assert len(batches) > len(epoch_batches(data, batch_size=64)[0])


def test_text_as_a_weighted_source_and_several_shard_sources(data):
    sources = [{"shards": str(data["a"]), "weight": 1}, {"shards": str(data["b"]), "weight": 0.4},
               {"shards": str(data["text"]), "weight": 2}]  # fmt: skip
    seen = used(epoch_batches(data, world=2, train_shards=sources, batch_size=3, text_chunk=4)[0]) + used(
        epoch_batches(data, world=2, train_shards=sources, batch_size=3, text_chunk=4)[1]
    )
    assert all(seen[f"a{i}"] == 1 for i in range(21))
    assert sum(seen[f"b{i}"] for i in range(5)) == 2  # round(0.4 x 5), a seeded subset
    text = {k: n for k, n in seen.items() if k.startswith("text-")}
    assert len(text) == 9 and set(text.values()) == {2}  # the empty line is no row
    assert "text-5" not in text and "text-9" in text  # keys are line numbers


def test_resampled_epochs_run_epoch_batches_per_rank(data):
    ranks = epoch_batches(data, world=2, batch_size=4, epoch_mode="resampled", epoch_batches=5,
                          text_jsonl=str(data["text"]), text_ratio=1.0)  # fmt: skip
    assert [len(r) for r in ranks] == [5, 5]


def test_workers_build_the_same_examples(data):
    plain = used(epoch_batches(data, batch_size=4, text_jsonl=str(data["text"]), text_ratio=0.5)[0])
    workers = used(epoch_batches(data, batch_size=4, text_jsonl=str(data["text"]), text_ratio=0.5, num_workers=2)[0])
    assert workers == plain


def test_a_row_without_its_fields_is_a_counted_skip(data, tmp_path):
    bad = tmp_path / "text.jsonl"
    bad.write_text(json.dumps({"instruction": "no answer"}) + "\n" + json.dumps({"instruction": "a", "response": "b"}) + "\n")
    batches = epoch_batches(data, batch_size=30, text_jsonl=str(bad), text_ratio=2 / 21)[0]
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skipped == {"missing_response": 1}
    assert "text-1" in used(batches)


def test_config_errors_are_clear(data):
    with pytest.raises(ValueError, match="exactly one of response_key or closed_task"):
        InstructionDataModule(train_shards=str(data["a"]), response_key=None)
    with pytest.raises(ValueError, match="epoch_batches"):
        InstructionDataModule(train_shards=str(data["a"]), epoch_mode="resampled")
    dm = InstructionDataModule(train_shards=str(data["a"]))
    with pytest.raises(RuntimeError, match="bind"):
        dm.train_dataloader()
