"""Tests for datamodules.audio: decoding, resampling, checks, silence splitting, FLAC round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from datamodules.audio import (
    AudioDecodeError,
    check_audio,
    decode_flac,
    encode_flac,
    load_audio,
    resample,
    split_at_silence,
)

PCM16_STEP = 1.0 / 32768


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def encoded(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("rate", "fmt", "stereo"),
    [(8000, "WAV", False), (22050, "WAV", False), (44100, "FLAC", True), (48000, "WAV", False)],
)
def test_resample_matches_sine_generated_at_16k(rate, fmt, stereo, tmp_path):
    x = sine(440, rate, 1.0)
    if stereo:
        # The 1 kHz part cancels in the channel mean, so only a correct downmix gives the 440 Hz sine.
        d = sine(1000, rate, 1.0, amp=0.3)
        x = np.stack([x + d, x - d], axis=1)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, rate, format=fmt, subtype="PCM_16")
    y, got_rate, notes = load_audio(path)
    assert got_rate == rate and notes["channels"] == (2 if stereo else 1) and y.ndim == 1
    z = resample(y, rate, 16000)
    assert z.dtype == np.float32 and len(z) == round(len(y) * 16000 / rate)
    ref = sine(440, 16000, 1.0)[: len(z)]
    edge = 800  # 50 ms: the filter's start-up and tail are not a steady-state sine
    err = np.abs(z[edge:-edge] - ref[edge:-edge]).max()
    assert err < 5e-3, err


def test_resample_same_rate_is_identity():
    x = sine(440, 16000, 0.1)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError):
        resample(x, 0, 16000)


def test_load_audio_mp3_and_rate_notes():
    data = encoded(sine(440, 48000, 0.5), 48000, fmt="MP3")
    x, rate, notes = load_audio(data, expected_rate=16000)
    assert rate == 48000 and notes["format"] == "MP3"
    assert notes["rate_mismatch"] is True and notes["expected_rate"] == 16000
    assert 0.2 < np.abs(x).max() < 0.8
    _, _, notes = load_audio(io.BytesIO(data), expected_rate=48000)
    assert notes["rate_mismatch"] is False


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "dev_zero.wav").symlink_to("/dev/zero")
    for path in (tmp_path, tmp_path / "dev_zero.wav"):  # refused from its stat, never opened
        with pytest.raises(AudioDecodeError) as err:
            load_audio(path)
        assert err.value.reason == "not_a_file"
    with pytest.raises(AudioDecodeError) as err:
        load_audio(b"this is not audio at all" * 10)
    assert err.value.reason == "unreadable"
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioDecodeError) as err:
        load_audio(tmp_path / "zero.wav")
    assert err.value.reason == "empty"


def test_check_audio_reasons():
    rate = 16000
    assert check_audio(np.zeros(0, np.float32), rate) == "empty"
    x = sine(440, rate, 0.1)
    assert check_audio(x, rate) is None
    bad = x.copy()
    bad[5] = np.nan
    assert check_audio(bad, rate) == "non_finite"
    bad[5] = np.inf
    assert check_audio(bad, rate) == "non_finite"
    assert check_audio(np.zeros(rate, np.float32), rate) == "silent"
    assert check_audio(np.full(rate, 5e-5, np.float32), rate) == "silent"
    assert check_audio(np.full(rate, 2e-4, np.float32), rate) is None
    assert check_audio(x, rate, min_seconds=0.5) == "too_short"


def test_nan_survives_decoding():
    x = sine(440, 16000, 0.1)
    x[100] = np.nan
    y, _, _ = load_audio(encoded(x, 16000, subtype="FLOAT"))
    assert check_audio(y, 16000) == "non_finite"


def test_split_at_silence_cuts_in_the_pauses():
    rate = 1000  # a low rate keeps the test fast; the method is rate-agnostic
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(75 * rate)).astype(np.float32)
    gaps = [(21.0, 21.6), (47.0, 47.5)]
    for a, b in gaps:
        x[int(a * rate) : int(b * rate)] = 0.0
    pieces = split_at_silence(x, rate, max_seconds=30.0)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(x)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))  # tiles with no gap or overlap
    assert all(b - a <= 30 * rate for a, b in pieces)
    assert len(pieces) == 3
    for (a, b), (_, end) in zip(gaps, pieces):
        assert a * rate <= end <= b * rate, (end / rate, a, b)
    assert np.array_equal(np.concatenate([x[a:b] for a, b in pieces]), x)


def test_split_at_silence_without_pauses_and_short_input():
    rate = 1000
    x = np.random.default_rng(1).standard_normal(61 * rate).astype(np.float32)
    pieces = split_at_silence(x, rate, max_seconds=30.0, min_seconds=2.0)
    assert sum(b - a for a, b in pieces) == len(x)
    assert all(2 * rate <= b - a <= 30 * rate for a, b in pieces)
    assert split_at_silence(x[: 30 * rate], rate) == [(0, 30 * rate)]
    assert split_at_silence(x[:0], rate) == [(0, 0)]
    with pytest.raises(ValueError):
        split_at_silence(x, rate, max_seconds=30.0, min_seconds=20.0)


def test_flac_round_trip_and_clipping():
    x = sine(440, 16000, 0.5, amp=0.9)
    data = encode_flac(x)
    assert data[:4] == b"fLaC"
    y, rate = decode_flac(data)
    assert rate == 16000 and len(y) == len(x)
    assert np.abs(y - x).max() <= PCM16_STEP
    loud = np.array([1.5, -1.5, 0.25], np.float32)
    y, _ = decode_flac(encode_flac(loud))
    # Clipped to full scale, not wrapped around to the opposite sign.
    assert y[0] > 0.999 and y[1] == -1.0 and abs(y[2] - 0.25) <= PCM16_STEP


def test_trim_silence_keeps_speech_and_a_little_context():
    from datamodules.audio import trim_silence

    rate = 16000
    t = np.arange(rate // 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    x = np.concatenate([np.zeros(rate, np.float32), tone, 1e-4 * np.ones(rate // 4, np.float32)])
    start, end = trim_silence(x, rate)
    assert abs(start - (rate - 800)) <= 400  # 50 ms of context before the tone, within a frame
    assert abs(end - (rate + rate // 2 + 800)) <= 400
    assert trim_silence(np.zeros(rate, np.float32), rate) == (0, rate)  # all quiet: untouched
