"""Tests for datamodules.prepare: manifests and HF datasets in, speech shards and a summary out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from datamodules.audio import decode_flac, resample, split_at_silence
from datamodules.manifests import PrepareError
from datamodules.prepare import main, min_piece_default, parse_size, prepare
from datamodules.report import EXIT_OK, EXIT_SKIPPED, EXIT_USAGE
from datamodules.shards import iter_tar_samples, read_index

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PCM16_STEP = 1.0 / 32768


def tone(freq: float, rate: int, seconds: float, amp: float = 0.4) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def read_split(folder: Path) -> dict[str, dict]:
    """Every sample of a shard folder, in index order: key -> {"audio", "rate", "json"}."""
    out = {}
    for tar in read_index(folder).paths():
        for s in iter_tar_samples(tar):
            audio, rate = decode_flac(s["flac"])
            out[s["__key__"]] = {"audio": audio, "rate": rate, "json": json.loads(s["json"])}
    return out


@pytest.fixture
def corpus(tmp_path):
    """Three good recordings at 16, 22.05 and 8 kHz in two splits, with a TSV manifest."""
    data = tmp_path / "corpus"
    (data / "wav").mkdir(parents=True)
    signals = {
        "a": (tone(300, 16000, 1.0), 16000),
        "b": (tone(500, 22050, 1.5), 22050),
        "c": (tone(700, 8000, 0.5), 8000),
    }
    for name, (x, rate) in signals.items():
        sf.write(data / "wav" / f"{name}.wav", x, rate, subtype="PCM_16")
    rows = [
        ["wav/a.wav", "hello there", "spk1", "en", "train", "utt.a", "f"],
        ["wav/b.wav", "good day", "spk2", "", "train", "", "m"],
        ["wav/c.wav", "bye", "spk1", "en", "dev", "", ""],
    ]
    manifest = write_tsv(
        data / "manifest.tsv", ["audio", "text", "speaker", "language", "split", "id", "gender"], rows
    )
    return manifest, signals


def test_round_trip_audio_metadata_and_index(corpus, tmp_path):
    manifest, _ = corpus
    out = tmp_path / "shards"
    summary = prepare(manifest=manifest, out=out, language="tw", workers=1, progress=False)
    assert summary.exit_code == EXIT_OK and summary.kept == summary.samples == 3 and not summary.skipped
    train, dev = read_split(out / "train"), read_split(out / "dev")
    assert list(train) == ["utt_a", "b"] and list(dev) == ["c"]  # id sanitised; else the file stem
    samples = {**train, **dev}
    for key, name in (("utt_a", "a"), ("b", "b"), ("c", "c")):
        x, rate = sf.read(manifest.parent / "wav" / f"{name}.wav", dtype="float32")  # as stored (PCM_16)
        got = samples[key]
        expected = resample(x, rate, 16000)
        assert got["rate"] == 16000 and len(got["audio"]) == len(expected)
        assert np.abs(got["audio"] - expected).max() <= PCM16_STEP
        meta = got["json"]
        assert meta["duration"] == pytest.approx(len(expected) / 16000)
        assert meta["orig_sample_rate"] == rate and meta["source"].endswith(f"wav/{name}.wav")
    assert samples["utt_a"]["json"]["text"] == "hello there" and samples["utt_a"]["json"]["gender"] == "f"
    assert samples["b"]["json"]["language"] == "tw"  # empty column -> the --language default
    assert samples["b"]["json"]["speaker"] == "spk2" and samples["c"]["json"]["language"] == "en"
    for split, folder in (("train", out / "train"), ("dev", out / "dev")):
        index = read_index(folder)
        stats = summary.splits[split]
        assert index.samples == stats["samples"] and index.seconds == pytest.approx(
            stats["seconds"], abs=1e-3
        )
        assert index.shards[0].durations == [
            round(s["json"]["duration"], 3) for s in read_split(folder).values()
        ]
    written = json.loads((out / "prepare_summary.json").read_text())
    assert written["samples"] == 3 and written["seconds"] == pytest.approx(3.0, abs=1e-3)


def test_rerun_is_deterministic_and_drops_stale_shards(corpus, tmp_path):
    manifest, _ = corpus
    out = tmp_path / "shards"
    prepare(manifest=manifest, out=out, max_samples=1, workers=1, progress=False)
    assert len(list((out / "train").glob("train-*.tar"))) == 2
    first = read_split(out / "train")
    # Second run: several worker processes and one shard per split; same samples in the same order.
    summary = prepare(manifest=manifest, out=out, workers=2, progress=False)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["train-000000.tar"]
    second = read_split(out / "train")
    assert list(first) == list(second) and summary.samples == 3
    for key in first:
        assert first[key]["json"] == second[key]["json"]
        assert np.array_equal(first[key]["audio"], second[key]["audio"])
    assert not list(out.rglob("*.tmp"))


def test_bad_inputs_are_counted_and_good_ones_kept(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "good.wav", tone(440, 16000, 1.0), 16000)
    sf.write(data / "rate.wav", tone(440, 16000, 0.5), 16000)
    (data / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 20)
    sf.write(data / "zero.wav", np.zeros(0, np.float32), 16000)
    sf.write(data / "silent.wav", np.zeros(16000, np.float32), 16000)
    nan = tone(440, 16000, 0.5)
    nan[10] = np.nan
    sf.write(data / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(data / "notext.wav", tone(440, 16000, 0.5), 16000)
    rng = np.random.default_rng(0)
    long = (0.2 * rng.standard_normal(65 * 8000)).astype(np.float32)
    long[20 * 8000 : 20 * 8000 + 4000] = 0.0  # a pause for the splitter to find
    sf.write(data / "long.wav", long, 8000)
    rows = [
        ["good.wav", "fine", ""],
        ["rate.wav", "rate", "8000"],
        ["corrupt.wav", "x", ""],
        ["missing.wav", "x", ""],
        ["zero.wav", "x", ""],
        ["silent.wav", "x", ""],
        ["nan.wav", "x", ""],
        ["notext.wav", "", ""],
        ["long.wav", "a long talk", ""],
        ["good.wav", "too many\tfields", ""],
    ]
    manifest = write_tsv(data / "manifest.tsv", ["audio", "text", "sample_rate"], rows)
    out = tmp_path / "out"
    rc = main(["--manifest", str(manifest), "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == EXIT_SKIPPED == 3
    summary = json.loads((out / "prepare_summary.json").read_text())
    expected = [
        "bad_manifest_row",
        "empty",
        "missing_file",
        "missing_text",
        "non_finite",
        "silent",
        "unreadable",
    ]
    assert summary["skipped"] == dict.fromkeys(expected, 1)
    assert summary["skipped_examples"]["missing_file"][0]["source"].endswith("missing.wav")
    assert summary["inputs"] == 10 and summary["kept"] == 3
    assert summary["warnings"]["rate_mismatch"] == 1 and summary["warnings"]["split_long"] == 1
    assert len((out / "prepare_skipped.tsv").read_text().splitlines()) == 1 + 7
    samples = read_split(out / "train")
    assert samples["rate"]["json"]["manifest_sample_rate"] == 8000  # kept at the file's own rate
    assert samples["rate"]["json"]["duration"] == pytest.approx(0.5)
    pieces = [s for k, s in samples.items() if k.startswith("long-")]
    assert len(pieces) == 3 and summary["samples"] == len(samples) == 2 + len(pieces)
    assert sum(p["json"]["duration"] for p in pieces) == pytest.approx(65.0)
    assert sum(len(p["audio"]) for p in pieces) == 65 * 16000
    assert all(p["json"]["duration"] <= 30.0 for p in pieces)
    assert [p["json"]["segment"] for p in pieces] == [0, 1, 2]
    assert pieces[1]["json"]["offset"] == pytest.approx(pieces[0]["json"]["duration"])
    assert {p["json"]["parent"] for p in pieces} == {"long"}
    assert all(p["json"]["text"] == "" and p["json"]["parent_text"] == "a long talk" for p in pieces)
    assert 20.0 <= pieces[0]["json"]["duration"] <= 20.25  # cut inside the pause
    assert "missing_text" in capsys.readouterr().out
    assert read_index(out / "train").samples == summary["samples"]


def test_exit_codes_for_usage_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o")]) == EXIT_USAGE  # no source
    assert main(["--manifest", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    no_audio = write_tsv(tmp_path / "m.tsv", ["path", "text"], [["a.wav", "x"]])
    assert main(["--manifest", str(no_audio), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    no_text = write_tsv(tmp_path / "n.tsv", ["audio"], [["a.wav"]])
    assert main(["--manifest", str(no_text), "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert "--no-require-text" in capsys.readouterr().err
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 1024**3 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_jsonl_manifest_duplicate_ids_and_no_require_text(tmp_path):
    sf.write(tmp_path / "x.wav", tone(440, 16000, 0.3), 16000)
    sf.write(tmp_path / "y.flac", tone(550, 16000, 0.3), 16000)
    rows = [
        {"audio": "x.wav", "id": "same.id", "speaker": 7},
        {"audio": "y.flac", "id": "same.id", "text": "why"},
        "not json",
    ]
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in rows]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = prepare(
        manifest=tmp_path / "m.jsonl", out=tmp_path / "o", require_text=False, workers=1, progress=False
    )
    samples = read_split(tmp_path / "o" / "train")
    assert list(samples) == ["same_id", "same_id_1"] and summary.warnings == {"duplicate_key": 1}
    assert samples["same_id"]["json"]["text"] == "" and samples["same_id"]["json"]["speaker"] == "7"
    assert summary.skipped == {"bad_manifest_row": 1} and summary.exit_code == EXIT_SKIPPED


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    sf.write(tmp_path / "on_disk.wav", tone(300, 8000, 0.5), 8000)

    def wav_bytes(x: np.ndarray, rate: int) -> bytes:
        path = tmp_path / "tmp.wav"
        sf.write(path, x, rate)
        return path.read_bytes()

    train = datasets.Dataset.from_dict(
        {
            "audio": [
                {"bytes": wav_bytes(tone(440, 22050, 0.6), 22050), "path": "clip one.wav"},
                {"bytes": None, "path": str(tmp_path / "on_disk.wav")},
                {"bytes": b"corrupt", "path": "bad.wav"},
            ],
            "sentence": ["one", "two", "three"],
            "client": ["s1", "s2", "s3"],
        }
    )
    test = datasets.Dataset.from_dict(
        {
            "audio": [{"bytes": wav_bytes(tone(440, 16000, 0.4), 16000), "path": None}],
            "sentence": ["four"],
            "client": ["s4"],
        }
    )
    # Built without torchcodec: struct columns cast to Audio are stored as they are.
    dd = datasets.DatasetDict({"train": train, "test": test}).cast_column("audio", datasets.Audio())
    dd.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "o"
    rc = main(
        ["--hf-dataset", str(tmp_path / "hf"), "--text-column", "sentence", "--speaker-column", "client"]
        + ["--language", "tw", "--out", str(out), "--workers", "2", "--no-progress"]
    )
    assert rc == EXIT_SKIPPED
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["skipped"] == {"unreadable": 1} and summary["kept"] == 3
    train_samples, test_samples = read_split(out / "train"), read_split(out / "test")
    assert list(train_samples) == ["clip_one", "on_disk"] and len(test_samples) == 1
    one = train_samples["clip_one"]
    assert one["json"]["text"] == "one" and one["json"]["speaker"] == "s1" and one["json"]["language"] == "tw"
    assert one["json"]["source"].endswith(":train:0:clip one.wav")
    expected = resample(tone(440, 22050, 0.6), 22050, 16000)
    assert np.abs(one["audio"] - expected).max() <= 2 * PCM16_STEP
    assert train_samples["on_disk"]["json"]["duration"] == pytest.approx(0.5)
    assert summary["splits"]["test"]["samples"] == read_index(out / "test").samples == 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_shared_english_clips_and_fsdd_subset(tmp_path):
    clips = SHARED / "english_clips" / "manifest.tsv"
    # Three clips have no transcript: kept with --no-require-text (they still serve stage 1) ...
    out = tmp_path / "clips"
    args = ["--manifest", str(clips), "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(out), "--no-require-text"]) == EXIT_OK
    summary = json.loads((out / "prepare_summary.json").read_text())
    index = read_index(out / "train")
    assert summary["kept"] == summary["inputs"] == index.samples == 8
    samples = read_split(out / "train")
    rates = {s["json"]["orig_sample_rate"] for s in samples.values()}
    assert rates == {16000, 22050, 44100, 48000}
    assert samples["jfk"]["json"]["channels"] == 2
    assert index.seconds == pytest.approx(summary["seconds"], abs=1e-2) and 55 < index.seconds < 65
    # ... and counted as missing_text skips by default.
    out = tmp_path / "clips_text"
    assert main([*args, "--out", str(out)]) == EXIT_SKIPPED
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert (
        summary["skipped"] == {"missing_text": 3}
        and read_index(out / "train").samples == summary["kept"] == 5
    )

    # fsdd: 2 speakers x 2 digits, every one kept.
    lines = (SHARED / "fsdd" / "manifest.tsv").read_text().splitlines()
    wanted = [
        ln
        for ln in lines[1:]
        if ln.split("\t")[2] in ("george", "jackson") and ln.split("\t")[1] in ("one", "two")
    ]
    sub = tmp_path / "fsdd.tsv"
    sub.write_text("\n".join([lines[0]] + [str(SHARED / "fsdd") + "/" + ln for ln in wanted]) + "\n")
    out = tmp_path / "fsdd"
    rc = main(["--manifest", str(sub), "--out", str(out), "--workers", "2", "--no-progress"])
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert rc == EXIT_OK and summary["skipped"] == {}, summary["skipped_examples"]
    index = read_index(out / "train")
    assert index.samples == summary["kept"] == len(wanted) == 200
    assert index.seconds == pytest.approx(summary["seconds"], abs=0.1)
    assert {s["json"]["speaker"] for s in read_split(out / "train").values()} == {"george", "jackson"}


def test_interrupted_run_leaves_no_loadable_half_state(corpus, tmp_path, monkeypatch):
    import datamodules.processing as prep

    manifest, _ = corpus
    out = tmp_path / "shards"
    prepare(manifest=manifest, out=out, workers=1, progress=False)
    real, calls = prep.process_item, []

    def interrupted(item, opts):
        calls.append(item.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(item, opts)

    monkeypatch.setattr(prep, "process_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(manifest=manifest, out=out, workers=1, progress=False)
    assert not list(out.rglob("*.tmp"))  # the open shard was removed, not renamed
    for tar in out.rglob("*.tar"):  # what remains are the earlier run's complete shards
        assert len(list(iter_tar_samples(tar))) >= 1
    with pytest.raises(FileNotFoundError):
        read_index(out / "train")  # the earlier run's index no longer claims to describe the folder
    assert not (out / "prepare_summary.json").exists()


def read_skipped(out: Path) -> dict[str, str]:
    """prepare_skipped.tsv as source file name -> reason."""
    rows = [line.split("\t") for line in (out / "prepare_skipped.tsv").read_text().splitlines()[1:]]
    return {Path(source).name: reason for source, reason, _ in rows}


def test_too_short_after_resampling_is_skipped_and_listed(tmp_path):
    sf.write(tmp_path / "one.wav", np.full(1, 0.5, np.float32), 44100)  # 0 samples at 16 kHz
    sf.write(tmp_path / "three.wav", np.full(3, 0.5, np.float32), 8000)  # 6 samples: 0.375 ms
    sf.write(tmp_path / "short.wav", tone(440, 22050, 0.2), 22050)
    rows = [["one.wav", "a"], ["three.wav", "b"], ["short.wav", "c"]]
    manifest = write_tsv(tmp_path / "m.tsv", ["audio", "text"], rows)
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--out", str(out), "--workers", "1", "--no-progress"]) == EXIT_SKIPPED
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["skipped"] == {"too_short": 2} and summary["kept"] == summary["samples"] == 1
    assert read_skipped(out) == {"one.wav": "too_short", "three.wav": "too_short"}
    details = [e["detail"] for e in summary["skipped_examples"]["too_short"]]
    assert details[0].startswith("0 ms") and details[1].startswith("0.375 ms")
    samples = read_split(out / "train")
    assert list(samples) == ["short"] and samples["short"]["json"]["duration"] == pytest.approx(0.2)
    # The threshold is an option: 0.25 s drops the 0.2 s file too; 0 keeps what has any sample.
    strict = prepare(manifest=manifest, out=tmp_path / "strict", min_seconds=0.25, workers=1, progress=False)
    assert strict.skipped == {"too_short": 3} and strict.kept == 0
    loose = prepare(manifest=manifest, out=tmp_path / "loose", min_seconds=0.0, workers=1, progress=False)
    assert loose.skipped == {"too_short": 1} and read_skipped(tmp_path / "loose") == {"one.wav": "too_short"}


def test_max_seconds_1_5_cuts_pieces_that_are_all_kept(tmp_path):
    # 1.5 s used to crash: the cutter needs pieces of at most half the cap, the fixed 1 s was more.
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "long.wav", (0.2 * rng.standard_normal(4 * 16000)).astype(np.float32), 16000)
    sf.write(tmp_path / "tiny.wav", tone(440, 16000, 0.3), 16000)
    manifest = write_tsv(tmp_path / "m.tsv", ["audio", "text"], [["long.wav", "x"], ["tiny.wav", "y"]])
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--out", str(out), "--workers", "1", "--no-progress"]
    assert main([*args, "--max-seconds", "1.5"]) == EXIT_OK
    samples = read_split(out / "train")
    pieces = [s for k, s in samples.items() if k.startswith("long-")]
    assert len(pieces) >= 3 and sum(len(p["audio"]) for p in pieces) == 4 * 16000
    assert all(0.75 <= p["json"]["duration"] <= 1.5 for p in pieces)  # min_piece_seconds defaults to 1.5 / 2
    assert samples["tiny"]["json"]["duration"] == pytest.approx(0.3)
    # Pieces are never too_short: a minimum above what a cut could leave is a usage error instead.
    assert main([*args, "--max-seconds", "1.5", "--min-seconds", "0.9"]) == EXIT_USAGE


@pytest.mark.parametrize("max_seconds", [1.0, 1.00003, 1.5, 2.7, 7.77, 29.99, 30.0, 64.1, 120.0])
def test_any_max_seconds_in_range_cuts_with_the_default_piece_length(max_seconds):
    piece = min_piece_default(max_seconds)
    assert 0.1 <= piece <= max_seconds / 2 and piece == min(1.0, max_seconds / 2)
    x = np.random.default_rng(1).standard_normal(int(2.3 * max_seconds * 16000) + 1).astype(np.float32)
    for n in (int(max_seconds * 16000) + 1, len(x)):  # just over the cap, and over two caps
        cuts = split_at_silence(x[:n], 16000, max_seconds=max_seconds, min_seconds=piece)
        lengths = [b - a for a, b in cuts]
        assert sum(lengths) == n and len(cuts) >= 2
        assert all(int(piece * 16000) <= k <= int(max_seconds * 16000) for k in lengths)


@pytest.mark.parametrize(
    "bad",
    [
        ["--max-seconds", "0.5"],
        ["--max-seconds", "nan"],
        ["--max-seconds", "inf"],
        ["--max-seconds", "abc"],
        ["--max-seconds", "-1"],
        ["--max-seconds", "121"],
        ["--min-seconds", "-0.1"],
        ["--min-seconds", "nan"],
        ["--min-piece-seconds", "inf"],
        ["--min-piece-seconds", "2", "--max-seconds", "3"],  # more than half the cap
        ["--min-piece-seconds", "0.05"],  # below --min-seconds (0.1)
        ["--max-samples", "0"],
        ["--max-samples", "1.5"],
        ["--max-bytes", "0"],
        ["--max-bytes", "lots"],
        ["--workers", "0"],
        ["--workers", "-3"],
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(bad, corpus, tmp_path, capsys):
    manifest, _ = corpus
    out = tmp_path / "out"
    rc = main(["--manifest", str(manifest), "--out", str(out), "--no-progress", *bad])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert last.startswith("speechless-prepare: error:") and bad[0] in last
    assert not out.exists()  # refused before anything was read or written


def test_prepare_refuses_bad_numbers_from_python_too(corpus, tmp_path):
    manifest, _ = corpus
    for kwargs in (
        {"max_seconds": float("nan")},
        {"max_seconds": float("inf")},
        {"max_seconds": 0.5},
        {"min_seconds": 2.0, "max_seconds": 3.0},
        {"workers": 0},
        {"max_bytes": 0},
    ):
        with pytest.raises(PrepareError, match="--"):
            prepare(manifest=manifest, out=tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(60)  # a link to /dev/zero must never be read
def test_directories_and_special_files_are_not_a_file(tmp_path):
    sf.write(tmp_path / "real.wav", tone(440, 16000, 0.5), 16000)
    (tmp_path / "adir.wav").mkdir()
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "link.wav").symlink_to(tmp_path / "real.wav")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    names = ["adir.wav", "zero.wav", "fifo.wav", "link.wav", "dangling.wav"]
    manifest = write_tsv(tmp_path / "m.tsv", ["audio", "text"], [[n, "t"] for n in names])
    out = tmp_path / "out"
    assert main(["--manifest", str(manifest), "--out", str(out), "--workers", "1", "--no-progress"]) == EXIT_SKIPPED
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["skipped"] == {"not_a_file": 3, "missing_file": 1} and summary["kept"] == 1
    assert read_skipped(out) == {
        "adir.wav": "not_a_file",
        "zero.wav": "not_a_file",
        "fifo.wav": "not_a_file",
        "dangling.wav": "missing_file",
    }
    details = " ".join(e["detail"] for e in summary["skipped_examples"]["not_a_file"])
    assert "a directory" in details and "a character device" in details and "a fifo" in details
    kept = read_split(out / "train")["link"]  # a link to a regular file is that file
    assert np.abs(kept["audio"] - tone(440, 16000, 0.5)).max() <= PCM16_STEP
    for not_a_manifest in ("zero.wav", "adir.wav"):  # nor is a manifest that is no file read
        assert main(["--manifest", str(tmp_path / not_a_manifest), "--out", str(tmp_path / "o")]) == EXIT_USAGE
