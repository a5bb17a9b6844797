"""The resumable prediction writer, in-process on one rank with a stand-in model (fast).

A stand-in LightningModule writes codes that follow from each text and from its one weight, so that
what a run wrote can be compared with what it should have, and it records the keys it was asked to
predict, so that a rerun's work is visible. An interruption here is an exception raised after some
batches (what is left on disk is what a kill leaves: finished shards with manifests, an open
temporary tar); the real ``kill -9`` over 2 ranks is in ``test_synthesis_resume.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from datamodules.shards import read_index
from datamodules.text import TextInstructionDataModule, load_instructions, row_id
from stages import writers
from stages.writers import ShardPredictionWriter, jsonl_records

N = 11  # instructions; odd, so the last shard is short


class Standin(LightningModule):
    """Codes ``[2, len(text)]``: level 0 the characters mod 32, level 1 the weight."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(weight))
        self.asked: list[str] = []

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        weights = [float(w) for w in batch["sample_weight"]]
        self.asked += [k for k, w in zip(batch["keys"], weights, strict=True) if w > 0]
        codes = [torch.tensor([[ord(c) % 32 for c in t], [int(self.w.item())] * len(t)]) for t in batch["texts"]]
        return {"keys": batch["keys"], "meta": batch["meta"], "codes": codes, "weights": weights}


class StopAfter(Callback):
    """Raise after ``n`` batches: the run stops with finished shards and one half-written."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 == self.n:
            raise RuntimeError("stopped")


def _instructions(path: Path, n: int = N) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i:02d}", "instruction": f"say {'x' * (i % 4)} {i}", "response": "ok"}) + "\n")
    return path


def _predict(out: Path, source: Path, *, model: Standin | None = None, stop_after: int | None = None,
             datamodule: bool = True, **writer_kw) -> Standin:
    model = model or Standin()
    writer = ShardPredictionWriter(output_dir=str(out), prefix="synthetic", max_samples=2,
                                   jsonl_name="synthetic.jsonl", **writer_kw)
    callbacks = [writer] + ([StopAfter(stop_after)] if stop_after else [])
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False)
    dm = TextInstructionDataModule(path=str(source), batch_size=3)
    if datamodule:
        trainer.predict(model, datamodule=dm)
    else:  # a loader without exclude_keys: everything is predicted again, the writer leaves out what is done
        dm.setup("predict")
        trainer.predict(model, dataloaders=dm.predict_dataloader())
    return model


def _ids(out: Path) -> list[str]:
    return [r["id"] for r in jsonl_records(out / "synthetic.jsonl")]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def source(tmp_path) -> Path:
    return _instructions(tmp_path / "instructions.jsonl")


@pytest.fixture
def reference(tmp_path, source) -> Path:
    _predict(tmp_path / "ref", source)
    return tmp_path / "ref"


def _stop(out: Path, source: Path, n: int = 3, **kw) -> set[str]:
    with pytest.raises(RuntimeError, match="stopped"):
        _predict(out, source, stop_after=n, **kw)
    done = {i for m in out.glob("*.manifest.json") for i in json.loads(m.read_text())["ids"]}
    assert 0 < len(done) < N and not (out / "index.json").exists()
    return done


def test_a_stopped_run_resumes_and_writes_each_id_once(tmp_path, source, reference):
    out = tmp_path / "out"
    done = _stop(out, source)
    assert list(out.glob(".synthetic-*.tar.tmp")), "the open shard should be left half-written"
    # Debris of a kill at other moments: a tar renamed but its manifest not yet written, a JSONL part.
    (out / "synthetic-r000-000077.tar").write_bytes(b"half")
    (out / "synthetic-r000-000078.jsonl").write_text('{"id": "q00"}\n')
    (out / ".synthetic.jsonl.tmp").write_text("killed in the merge")
    # A finished shard cut short afterwards (a disk error) is not finished any more: predicted again.
    first = json.loads((out / "synthetic-r000-000000.manifest.json").read_text())
    tar = out / first["shard"]["url"]
    tar.write_bytes(tar.read_bytes()[:100])
    done -= set(first["ids"])
    (out / ".index.json.tmp-1").write_text("killed in the merge")
    model = _predict(out, source)
    assert sorted(model.asked) == sorted({f"q{i:02d}" for i in range(N)} - done)  # nothing predicted twice
    assert _ids(out) == sorted(f"q{i:02d}" for i in range(N))
    assert jsonl_records(out / "synthetic.jsonl") == jsonl_records(reference / "synthetic.jsonl")
    index = read_index(out)
    assert index.samples == N and all(Path(p).exists() for p in index.paths())
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.stem.endswith(("000077", "000078"))]
    assert not leftovers, leftovers


def test_a_rerun_after_a_complete_run_does_nothing(reference, source):
    before = _files(reference)
    model = _predict(reference, source)
    assert model.asked == []
    assert _files(reference) == before


def test_another_model_restarts_or_is_refused(tmp_path, source, reference):
    out = tmp_path / "out"
    _stop(out, source)
    with pytest.raises(ValueError, match="weights"):
        _predict(out, source, model=Standin(weight=2.0), on_change="refuse")
    model = _predict(out, source, model=Standin(weight=2.0))  # restart (the default)
    assert len(model.asked) == N
    records = jsonl_records(out / "synthetic.jsonl")
    assert [r["id"] for r in records] == _ids(reference)
    assert all(set(r["codes"][1]) == {2} for r in records)  # every record from the new model
    assert read_index(out).samples == N


def test_another_instruction_set_is_refused(tmp_path, source):
    out = tmp_path / "out"
    _stop(out, source)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line for line in source.read_text().splitlines(True) if '"q00"' not in line
                             and '"q01"' not in line))
    with pytest.raises(ValueError, match="another instruction set"):
        _predict(out, other)


def test_added_instructions_are_synthesized_on_a_rerun(tmp_path, reference, source):
    bigger = _instructions(tmp_path / "bigger.jsonl", n=N + 3)
    model = _predict(reference, bigger)
    assert sorted(model.asked) == [f"q{i:02d}" for i in range(N, N + 3)]
    assert _ids(reference) == [f"q{i:02d}" for i in range(N + 3)]


def test_a_loader_without_exclude_keys_predicts_again_and_writes_only_the_rest(tmp_path, source, reference):
    out = tmp_path / "out"
    _stop(out, source, datamodule=False)
    model = _predict(out, source, datamodule=False)
    assert len(model.asked) == N
    assert jsonl_records(out / "synthetic.jsonl") == jsonl_records(reference / "synthetic.jsonl")


def test_the_jsonl_merge_streams_sorted_parts_in_groups(tmp_path, source, reference, monkeypatch):
    monkeypatch.setattr(writers, "FAN_IN", 2)  # 6 parts: merged in groups of 2, then 2 of those
    out = tmp_path / "out"
    _predict(out, source)
    assert (out / "synthetic.jsonl").read_bytes() == (reference / "synthetic.jsonl").read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_remaining_instructions_split_into_equal_batch_counts(source):
    # Rank 0's block was written, rank 1's was not: the rest is split again, both ranks run as many batches.
    done = {f"q{i:02d}" for i in range(6)}
    counts, seen = [], []
    for rank in range(2):
        dm = TextInstructionDataModule(path=str(source), batch_size=2, rank=rank, world_size=2)
        dm.setup("predict")
        assert dm.exclude_keys(done) == N - 6
        batches = list(dm.predict_dataloader())
        counts.append(len(batches))
        seen += [k for b in batches for k, w in zip(b["keys"], b["sample_weight"], strict=True) if w > 0]
    assert counts[0] == counts[1] and sorted(seen) == [f"q{i:02d}" for i in range(6, N)]
    for rank in range(2):  # nothing left: every rank runs zero batches
        dm = TextInstructionDataModule(path=str(source), batch_size=2, rank=rank, world_size=2)
        dm.setup("predict")
        assert dm.exclude_keys({f"q{i:02d}" for i in range(N)}) == 0
        assert len(list(dm.predict_dataloader())) == 0


def test_ids_without_an_id_field_are_content_hashes(tmp_path):
    rows = [{"instruction": "one", "response": "a"}, {"instruction": "two", "response": "b"}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    ids_a = {r["instruction"]: r["id"] for r in load_instructions(a)}
    ids_b = {r["instruction"]: r["id"] for r in load_instructions(b)}
    assert ids_a == ids_b and ids_a["one"] == row_id(rows[0]) and ids_a["one"] != ids_a["two"]
    a.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="duplicate id .* identical"):
        load_instructions(a)
    a.write_text(json.dumps({"id": "x.1", "instruction": "one"}) + "\n")
    with pytest.raises(ValueError, match="shard key"):
        load_instructions(a)


def test_stage1_tokenization_resumes_through_the_same_writer(tiny_corpus, tmp_path):
    """Stage 1's SpeechDataModule has no exclude_keys: the rerun tokenizes all again, writes the rest once."""
    from datamodules.speech import SpeechDataModule
    from models.encoders import Gemma4AudioEncoder
    from models.rvq import ResidualVQ
    from stages.stage1 import RVQStage

    def run(out: Path, stop_after: int | None = None) -> ShardPredictionWriter:
        torch.manual_seed(0)
        stage = RVQStage(encoder=Gemma4AudioEncoder(source=str(tiny_corpus["encoder"])),
                         quantizer=ResidualVQ(dim=64, num_quantizers=2, codebook_size=16, kmeans_init=False))
        dm = SpeechDataModule(predict_shards=str(tiny_corpus["train"]), max_batch_seconds=4.0, max_batch_size=4,
                              num_workers=0)
        writer = ShardPredictionWriter(output_dir=str(out), max_samples=3)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[writer] + ([StopAfter(stop_after)] if stop_after else []))
        trainer.predict(stage, datamodule=dm)
        return writer

    run(tmp_path / "ref")
    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path / "out", stop_after=2)
    writer = run(tmp_path / "out")
    assert writer.already > 0 and writer.written + writer.already == 30
    ref, got = (jsonl_records(tmp_path / d / "semantic_tokens.jsonl") for d in ("ref", "out"))
    assert len({r["id"] for r in got}) == len(got) == 30 and got == ref
