"""Audio decoding, validation, resampling and silence splitting for data preparation.

Pure functions over numpy arrays; no model and no framework import. They follow what the speech
toolkits this project's users know do before tokenising speech:

- decode with libsndfile (``soundfile``; wav, flac, ogg/vorbis/opus, and mp3 since libsndfile 1.1),
  downmix to mono by averaging channels, resample to 16 kHz with soxr's high-quality filter (what
  Whisper-style encoders, the Gemma 4 audio encoder included, expect);
- split audio longer than the encoders' 30 s window at its quietest point, as the DiffusionGemma ASR
  recipe does for long recordings (see ``../shared/DESIGN.md``), with a frame-energy criterion rather
  than a neural VAD so preparation has no model dependency;
- store 16 kHz mono audio as PCM_16 FLAC, the ``flac`` member of the speech shard contract.
"""

from __future__ import annotations

import io
import os
import stat
from typing import IO, Any

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "SILENCE_PEAK",
    "TARGET_RATE",
    "AudioDecodeError",
    "check_audio",
    "decode_flac",
    "encode_flac",
    "load_audio",
    "resample",
    "split_at_silence",
    "trim_silence",
]

TARGET_RATE = 16000
# A peak below 1e-4 (-80 dBFS, about 3 LSB of 16-bit audio) holds no speech: after PCM_16 storage it
# would be at most a few quantisation steps of noise.
SILENCE_PEAK = 1e-4


class AudioDecodeError(ValueError):
    """Audio that could not be decoded; ``reason`` is ``"unreadable"``, ``"empty"`` (zero bytes) or
    ``"not_a_file"`` (a path to a directory, device, fifo or socket)."""

    def __init__(self, message: str, *, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


def load_audio(
    source: str | os.PathLike | bytes | bytearray | IO[bytes], *, expected_rate: int | None = None
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Decode an audio file to mono float32 at its own sample rate.

    Args:
        source: a path, the encoded bytes, or a binary file-like object.
        expected_rate: the rate a manifest claims. The file header's rate is used regardless (it is
            what the samples were recorded at); a disagreement is recorded in the notes so the
            caller can report it.

    Returns:
        ``(x, rate, notes)``: ``x`` float32 ``[N]`` (channels averaged), ``rate`` in Hz from the
        header, ``notes`` with ``rate``, ``channels``, ``frames``, ``format``, ``subtype``, and, when
        ``expected_rate`` was given, ``expected_rate`` and ``rate_mismatch`` (bool).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist (or a link to nothing).
        AudioDecodeError: the path is not a regular file (``not_a_file``; it is never opened, so a
            link to ``/dev/zero`` or a fifo is not read), the data is empty (zero bytes) or not
            audio libsndfile can decode.
    """
    name = "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            info = os.stat(name)  # follows links: a link to a regular file is that file
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"audio file not found: {name}") from None
        if not stat.S_ISREG(info.st_mode):
            kind = _file_kind(info.st_mode)
            raise AudioDecodeError(f"{name}: not a regular file ({kind})", reason="not_a_file")
        if info.st_size == 0:
            raise AudioDecodeError(f"{name}: zero-byte file", reason="empty")
    elif isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioDecodeError("zero-byte audio data", reason="empty")
        source = io.BytesIO(source)
    try:
        with sf.SoundFile(source) as f:
            rate, channels, fmt, subtype = f.samplerate, f.channels, f.format, f.subtype
            data = f.read(dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioDecodeError(f"{name}: cannot decode audio ({err})") from err
    if rate <= 0:
        raise AudioDecodeError(f"{name}: invalid sample rate {rate}")
    x = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    notes: dict[str, Any] = {
        "rate": int(rate),
        "channels": int(channels),
        "frames": int(len(x)),
        "format": fmt,
        "subtype": subtype,
    }
    if expected_rate is not None:
        notes["expected_rate"] = int(expected_rate)
        notes["rate_mismatch"] = int(expected_rate) != int(rate)
    return np.ascontiguousarray(x, dtype=np.float32), int(rate), notes


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), f"mode {mode:o}")


def resample(x: np.ndarray, orig_rate: int, target_rate: int = TARGET_RATE) -> np.ndarray:
    """Resample mono audio with soxr's high-quality (``HQ``) filter.

    Args:
        x: float audio ``[N]``.
        orig_rate: its rate in Hz.
        target_rate: the wanted rate in Hz.

    Returns:
        float32 ``[round(N * target_rate / orig_rate)]``; ``x`` itself when the rates are equal.
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    x = np.asarray(x, dtype=np.float32)
    if orig_rate == target_rate or len(x) == 0:
        return x
    return soxr.resample(x, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def check_audio(
    x: np.ndarray, rate: int, *, silence_peak: float = SILENCE_PEAK, min_seconds: float = 0.0
) -> str | None:
    """Say why a signal should not be kept, or ``None`` when it is usable.

    Args:
        x: audio ``[N]``.
        rate: its rate in Hz.
        silence_peak: a signal whose absolute peak is below this is ``"silent"`` (default 1e-4,
            -80 dBFS; a peak criterion, so one click makes a file non-silent, which keeps borderline
            files rather than dropping them).
        min_seconds: a signal shorter than this is ``"too_short"`` (0 disables the check).

    Returns:
        ``"empty"`` (no samples), ``"non_finite"`` (NaN or inf samples), ``"silent"``,
        ``"too_short"``, or ``None``.
    """
    if len(x) == 0:
        return "empty"
    if not np.isfinite(x).all():
        return "non_finite"
    if float(np.max(np.abs(x))) < silence_peak:
        return "silent"
    if min_seconds > 0 and len(x) < min_seconds * rate:
        return "too_short"
    return None


def split_at_silence(
    x: np.ndarray,
    rate: int,
    *,
    max_seconds: float = 30.0,
    min_seconds: float = 1.0,
    frame_seconds: float = 0.025,
    hop_seconds: float = 0.010,
    search_from: float = 0.5,
) -> list[tuple[int, int]]:
    """Cut a long signal into pieces of at most ``max_seconds``, each cut at the quietest point.

    Method (energy, not a neural VAD): while more than ``max_seconds`` remain after the current start
    ``s``, candidate cut points are laid every ``hop_seconds`` in the latter part of the window,
    ``[s + search_from * max_seconds, s + max_seconds]`` (never closer than ``min_seconds`` to the end
    of the signal), and the cut goes where the RMS of the ``frame_seconds`` frame centred on it is
    lowest (the earliest on ties). Searching the latter part keeps pieces long; the frame RMS finds
    the pause between words or sentences when there is one, and the least-energetic point otherwise.

    Args:
        x: audio ``[N]``.
        rate: its rate in Hz.
        max_seconds: the longest piece (the encoders' 30 s window).
        min_seconds: no piece, the last included, is shorter than this when the signal is longer
            than ``max_seconds``.
        frame_seconds: RMS frame length.
        hop_seconds: distance between candidate cut points.
        search_from: where in the window the search starts, as a fraction of ``max_seconds``.

    Returns:
        ``[(start, end), ...]`` sample ranges in order; they tile ``[0, N)`` exactly (no sample lost
        or repeated), each at most ``max_seconds * rate`` long. One range for short signals.
    """
    n = len(x)
    max_len = int(max_seconds * rate)
    min_len = int(min_seconds * rate)
    if max_len < 1:
        raise ValueError(f"max_seconds={max_seconds} is shorter than one sample at {rate} Hz")
    # Offset of the earliest allowed cut; the window must leave room for a last piece of min_len.
    lo_off = max(min_len, int(search_from * max_len), 1)
    if not 0.0 <= search_from < 1.0 or min_len < 0 or lo_off > max_len - min_len:
        raise ValueError(
            f"cannot split with max_seconds={max_seconds}, min_seconds={min_seconds}, "
            f"search_from={search_from}: need min_seconds <= (1 - search_from) * max_seconds and "
            "min_seconds <= max_seconds / 2"
        )
    if n <= max_len:
        return [(0, n)]
    frame = max(1, int(frame_seconds * rate))
    hop = max(1, int(hop_seconds * rate))
    # Running energy in float64: energy of [a, b) is csum[b] - csum[a] without float32 drift.
    csum = np.concatenate([[0.0], np.cumsum(np.square(x, dtype=np.float64))])
    pieces: list[tuple[int, int]] = []
    start = 0
    while n - start > max_len:
        lo = start + lo_off
        hi = min(start + max_len, n - min_len)
        cuts = np.arange(hi, lo - 1, -hop)[::-1]  # always includes hi, the furthest allowed cut
        a = np.clip(cuts - frame // 2, 0, n)
        b = np.clip(cuts + frame - frame // 2, 0, n)
        rms = np.sqrt((csum[b] - csum[a]) / np.maximum(b - a, 1))
        cut = int(cuts[int(np.argmin(rms))])
        pieces.append((start, cut))
        start = cut
    pieces.append((start, n))
    return pieces


def encode_flac(x: np.ndarray, rate: int = TARGET_RATE) -> bytes:
    """Encode mono audio as 16-bit FLAC.

    Samples outside ``[-1, 1)`` are clipped to the 16-bit range (libsndfile would otherwise wrap
    them); callers that care count them first with ``np.abs(x) > 1``.

    Args:
        x: float audio ``[N]``, nominally in ``[-1, 1]``.
        rate: its rate in Hz.

    Returns:
        The FLAC file's bytes.
    """
    x = np.clip(np.asarray(x, dtype=np.float32), -1.0, 32767.0 / 32768.0)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """Decode FLAC (or any libsndfile format) bytes to mono float32.

    Returns:
        ``(x, rate)``: float32 ``[N]`` and the rate in Hz.
    """
    x, rate, _ = load_audio(data)
    return x, rate


def trim_silence(
    x: np.ndarray, rate: int, *, threshold_db: float = -35.0, frame_seconds: float = 0.025, pad_seconds: float = 0.05
) -> tuple[int, int]:
    """Bounds ``(start, end)`` of ``x`` without its leading and trailing silence.

    A 25 ms frame is silent when its RMS is ``threshold_db`` below the loudest frame's; ``pad_seconds``
    of context is kept on each side. Speech inside the bounds is never touched, and all-quiet audio
    keeps its full length (``check_audio`` decides about silence).

    Returns:
        Sample indices with ``0 <= start < end <= len(x)``.
    """
    frame = max(1, int(frame_seconds * rate))
    n = len(x) // frame
    if n < 2:
        return 0, len(x)
    rms = np.sqrt(np.mean(np.square(x[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (threshold_db / 20))
    if loud.size == 0:
        return 0, len(x)
    pad = int(pad_seconds * rate)
    start = max(0, loud[0] * frame - pad)
    end = min(len(x), (loud[-1] + 1) * frame + pad)
    return int(start), int(end)
