"""Tests for the embedded demo corpus (demo/corpus.py) and its TTS backends (demo/tts.py)."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import stat
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from demo import tts
from demo.corpus import build_demo_corpus, main, make_speakers
from demo.tasks import DIGITS, next_digit

SMALL = {"n_speakers": 4, "takes": 2, "n_val": 1, "n_test": 1, "seed": 3}


def _read_wav(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0, f.getframerate(), f.getnchannels()


def _manifest(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def _word_features(audio: np.ndarray) -> np.ndarray:
    """Band log-energies of the active frames in four time slices, normalised per clip."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 400)[::160] * np.hanning(400)
    power = np.log(np.abs(np.fft.rfft(frames, axis=1))[:, :200] ** 2 + 1e-6)
    bands = power.reshape(len(power), 20, 10).mean(2)
    energy = bands.mean(1)
    active = bands[energy > energy.max() - 6]
    v = np.concatenate([s.mean(0) for s in np.array_split(active, 4)])
    return (v - v.mean()) / v.std()


def _nearest_accuracy(templates: list[np.ndarray], queries: list[np.ndarray]) -> float:
    """Fraction of queries whose nearest template has the same index."""
    a, b = np.stack(templates), np.stack(queries)
    return float((((b[:, None] - a[None]) ** 2).sum(-1).argmin(1) == np.arange(len(b))).mean())


def _ltas(clips: list[np.ndarray]) -> np.ndarray:
    """Long-term average log spectrum: a crude speaker signature."""
    frames = np.concatenate([np.lib.stride_tricks.sliding_window_view(c, 512)[::160] for c in clips])
    p = np.log((np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)) ** 2).mean(0)[:256] + 1e-9)
    p = p.reshape(32, 8).mean(1)
    return p - p.mean()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "raw"
    summary = build_demo_corpus(out, workers=2, **SMALL)
    return out, summary


def test_manifest_matches_files_and_summary(corpus):
    out, summary = corpus
    rows = _manifest(out / "manifest.tsv")
    assert (out / "manifest.tsv").read_text().splitlines()[0] == "audio\ttext\tspeaker\tlanguage\tsplit"
    assert len(rows) == 4 * 10 * 2 == summary["clips"]["total"]
    on_disk = {p.relative_to(out).as_posix() for p in (out / "wav").rglob("*.wav")}
    assert on_disk == {r["audio"] for r in rows}
    for split in ("train", "val", "test"):
        assert _manifest(out / f"manifest_{split}.tsv") == [r for r in rows if r["split"] == split]
    assert all(r["language"] == "en" and r["text"] in DIGITS for r in rows)
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["backend"] == tts.resolve_backend() and meta["seed"] == 3
    total = sum(len(_read_wav(out / r["audio"])[0]) for r in rows) / 16000
    assert meta["seconds"]["total"] == pytest.approx(total, abs=0.01)
    speakers = _manifest(out / "speakers.tsv")
    assert [s["speaker"] for s in speakers] == ["spk00", "spk01", "spk02", "spk03"]
    assert {s["speaker"]: s["split"] for s in speakers} == {r["speaker"]: r["split"] for r in rows}


def test_splits_are_speaker_disjoint_and_cover_all_words(corpus):
    out, summary = corpus
    rows = _manifest(out / "manifest.tsv")
    by_split = {s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"])
    assert not by_split["val"] & by_split["test"]
    for split in by_split:
        assert {r["text"] for r in rows if r["split"] == split} == set(DIGITS)
    assert summary["splits"] == {s: sorted(by_split[s]) for s in by_split}


def test_audio_is_16k_mono_speech_that_differs_by_word_and_speaker(corpus):
    out, _ = corpus
    clips = {}
    for r in _manifest(out / "manifest.tsv"):
        audio, rate, channels = _read_wav(out / r["audio"])
        assert rate == 16000 and channels == 1
        assert 0.2 < len(audio) / rate < 2.0
        assert np.sqrt(np.mean(audio**2)) > 0.01, r["audio"]
        clips[r["audio"].rsplit("/", 1)[1][:-4]] = audio
    # Words: templates from one speaker recognise another speaker's words far above chance (0.1).
    for query in ("spk01", "spk02", "spk03"):
        accuracy = _nearest_accuracy(
            [_word_features(clips[f"{d}_spk00_0"]) for d in range(10)],
            [_word_features(clips[f"{d}_{query}_1"]) for d in range(10)],
        )
        assert accuracy >= 0.5, (query, accuracy)
    # Speakers: one take's average spectrum identifies the speaker of the other take.
    spk = ["spk00", "spk01", "spk02", "spk03"]
    accuracy = _nearest_accuracy(
        [_ltas([clips[f"{d}_{s}_0"] for d in range(10)]) for s in spk],
        [_ltas([clips[f"{d}_{s}_1"] for d in range(10)]) for s in spk],
    )
    assert accuracy >= 0.75
    assert not np.array_equal(clips["7_spk00_0"][:4000], clips["7_spk00_1"][:4000])  # takes differ too


def test_instruction_files(corpus):
    out, _ = corpus
    rows = _manifest(out / "manifest.tsv")
    ids = set()
    for split in ("train", "val", "test"):
        items = [json.loads(line) for line in (out / f"instructions_{split}.jsonl").read_text().splitlines()]
        assert len(items) == sum(r["split"] == split for r in rows)
        for item in items:
            assert item["response"] == DIGITS[(DIGITS.index(item["instruction"]) + 1) % 10]
            assert (out / item["audio"]).exists()
            ids.add(item["id"])
    assert len(ids) == len(rows)
    assert next_digit("nine") == "zero" and next_digit("three") == "four"
    text = [json.loads(line) for line in (out / "text_instructions.jsonl").read_text().splitlines()]
    assert {"id": "text-after-seven", "instruction": "What comes after seven?", "response": "eight"} in text
    assert len({t["id"] for t in text}) == len(text) >= 10


def test_build_is_deterministic_across_processes_and_orders(corpus, tmp_path):
    out, _ = corpus
    # workers=1 synthesizes in another order and other processes than the fixture's workers=2.
    again = build_demo_corpus(tmp_path / "again", workers=1, **SMALL)
    assert not again["reused"]
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_rebuild_is_skipped_repaired_or_cleaned(tmp_path):
    out = tmp_path / "raw"
    small = {"n_speakers": 3, "n_val": 1, "n_test": 1, "backend": "builtin", "workers": 1}
    first = build_demo_corpus(out, takes=2, **small)
    assert first["backend"] == "builtin" and not first["reused"] and first["clips"]["total"] == 60
    clip = out / "wav" / "spk00" / "3_spk00_1.wav"
    mtime = clip.stat().st_mtime_ns
    assert build_demo_corpus(out, takes=2, **small)["reused"]
    assert clip.stat().st_mtime_ns == mtime
    clip.unlink()  # a missing file forces a rebuild, which restores it
    assert not build_demo_corpus(out, takes=2, **small)["reused"] and clip.exists()
    fewer = build_demo_corpus(out, takes=1, **small)  # different parameters: rebuilt, stale clips removed
    assert not fewer["reused"] and fewer["stale_removed"] == 30
    assert len(list((out / "wav").rglob("*.wav"))) == len(_manifest(out / "manifest.tsv")) == 30


def test_builtin_synthesizer_is_distinguishable_and_deterministic():
    voices = ("en-us", "en+f2", "en-gb-scotland+m3")
    clips = {v: [tts.synthesize(w, voice=v, backend="builtin") for w in DIGITS] for v in voices}
    for v in voices:
        for audio in clips[v]:
            assert audio.dtype == np.float32 and np.sqrt(np.mean(audio**2)) > 0.02
    assert np.array_equal(clips["en-us"][7], tts.synthesize("seven", voice="en-us", backend="builtin"))
    assert len(tts.synthesize("seven", voice="en-us", rate_wpm=120, backend="builtin")) > len(
        clips["en-us"][7]
    )
    templates = [_word_features(a) for a in clips["en-us"]]
    for v in voices[1:]:
        assert _nearest_accuracy(templates, [_word_features(a) for a in clips[v]]) >= 0.8
    assert not np.allclose(_ltas(clips["en-us"]), _ltas(clips["en+f2"]), atol=0.3)


def test_espeakng_loader_backend_is_deterministic_in_forked_workers():
    pytest.importorskip("espeakng_loader")
    say = functools.partial(
        tts.synthesize, voice="en-us+f3", rate_wpm=170, pitch=55, backend="espeakng-loader"
    )
    words = ["seven", "two", "seven", "nine"]
    here = [say(w) for w in words]
    assert all(a.dtype == np.float32 and 0.2 < len(a) / 16000 < 1.5 and np.abs(a).max() > 0.05 for a in here)
    # The breathy f3 variant draws noise, and the engine keeps state: neither may leak between calls.
    assert np.array_equal(here[0], here[2]) and not np.array_equal(here[0][:3000], here[1][:3000])
    with mp.get_context("fork").Pool(2) as pool:
        there = pool.map(say, words[::-1])
    assert all(np.array_equal(a, b) for a, b in zip(here, there[::-1]))
    assert len(tts.synthesize("seven", voice="en-us", rate_wpm=120, backend="espeakng-loader")) > len(
        tts.synthesize("seven", voice="en-us", rate_wpm=300, backend="espeakng-loader")
    )
    assert "eSpeak NG" in tts.backend_version("espeakng-loader")
    with pytest.raises(tts.SynthesisError, match="unknown voice"):
        tts.synthesize("one", voice="xx-nonexistent", backend="espeakng-loader")


_FAKE_ESPEAK = """#!{python}
import json, math, os, struct, sys
if sys.argv[1:] == ["--version"]:
    print("eSpeak NG text-to-speech: 9.9 (fake)")
    sys.exit(0)
with open(os.environ["FAKE_ESPEAK_LOG"], "w") as f:
    json.dump(sys.argv[1:], f)
rate = 22050
pcm = b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * 440 * i / rate))) for i in range(rate // 2))
fmt = struct.pack("<HHIIHH", 1, 1, rate, 2 * rate, 2, 16)
# espeak-ng streams to stdout, so its RIFF and data sizes are placeholders.
sys.stdout.buffer.write(b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
                        + b"data" + struct.pack("<I", 0x7FFFFFFF) + pcm)
"""


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "espeak-ng"
    exe.parent.mkdir()
    exe.write_text(_FAKE_ESPEAK.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ESPEAK_LOG", str(tmp_path / "argv.json"))
    tts._auto_backend.cache_clear()
    yield tmp_path / "argv.json"
    tts._auto_backend.cache_clear()


def test_system_espeak_ng_is_preferred_and_its_wav_stream_parsed(fake_espeak):
    assert tts.resolve_backend() == "espeak-ng"
    audio = tts.synthesize("seven", voice="en-us+f3", rate_wpm=170, pitch=60)
    assert json.loads(fake_espeak.read_text()) == [
        "-v",
        "en-us+f3",
        "-s",
        "170",
        "-p",
        "60",
        "--stdout",
        "seven",
    ]
    assert abs(len(audio) - 8000) <= 2  # 0.5 s resampled from 22050 to 16000 Hz
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5
    assert np.abs(audio).max() == pytest.approx(9000 / 32768, rel=0.05)
    assert "9.9" in tts.backend_version()


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="rate_wpm"):
        tts.synthesize("one", voice="en", rate_wpm=20)
    with pytest.raises(ValueError, match="pitch"):
        tts.synthesize("one", voice="en", pitch=120)
    with pytest.raises(ValueError, match="non-empty"):
        tts.synthesize("  ", voice="en")
    with pytest.raises(ValueError, match="unknown TTS backend"):
        tts.synthesize("one", voice="en", backend="festival")
    with pytest.raises(ValueError, match="n_speakers"):
        make_speakers(40)
    with pytest.raises(ValueError, match="train speaker"):
        make_speakers(3, n_val=2, n_test=1)
    assert (
        main(["--out", str(tmp_path / "x"), "--speakers", "2", "--val-speakers", "1", "--test-speakers", "1"])
        == 1
    )


def test_console_script_builds_a_corpus(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "raw"), "--speakers", "3", "--takes", "1", "--val-speakers", "1"]
    argv += ["--test-speakers", "1", "--backend", "builtin", "--workers", "1"]
    assert main(argv) == 0
    assert "30 clips" in capsys.readouterr().out
    assert len(_manifest(tmp_path / "raw" / "manifest.tsv")) == 30
    assert main(argv) == 0 and "reused" in capsys.readouterr().out
