"""Speech synthesis backends for the embedded demo corpus: espeak-ng, then a numpy fallback.

One function, :func:`synthesize`, turns a short text into 16 kHz mono float audio with one of three
backends, picked in this order by ``backend="auto"``:

1. ``"espeak-ng"``: the system binary, ``espeak-ng -v VOICE -s RATE -p PITCH --stdout TEXT``.
2. ``"espeakng-loader"``: the shared library and voice data shipped in the ``espeakng-loader`` wheel,
   driven through ``ctypes`` following eSpeak NG's ``speak_lib.h`` (``espeak_Initialize`` in
   ``AUDIO_OUTPUT_SYNCHRONOUS`` mode, a synth callback collecting int16 samples, ``espeak_Synth``).
   This is what makes the demo run on a fresh machine with nothing but ``pip install``.
3. ``"builtin"``: a deterministic formant synthesizer (numpy only) for machines where neither works:
   each letter becomes a vowel (two formants), a nasal/liquid, a fricative hiss or a stop burst, with a
   speaker-dependent f0 and formant scale. Not intelligible English, but every word has its own,
   reproducible acoustic pattern, which is all a closed-vocabulary demo needs.

Determinism: the eSpeak NG library keeps state across utterances in function-level statics (the pitch
flutter phase of its wave generator is never reset, not even by ``espeak_Terminate``), so the same
text synthesized twice in one process differs. The library backend therefore initialises the engine
once per process and synthesizes every utterance in a forked child of that pristine state, as the
command line does with a fresh process per call: the result depends only on the arguments, not on
what was synthesized before or in which worker.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import struct
import subprocess
import threading
import zlib

import numpy as np

from datamodules.audio import resample

__all__ = [
    "BACKENDS",
    "SynthesisError",
    "backend_version",
    "resolve_backend",
    "synthesize",
]

BACKENDS = ("espeak-ng", "espeakng-loader", "builtin")

# speak_lib.h constants.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() when data is missing
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_NOT_FOUND = 2
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class SynthesisError(RuntimeError):
    """A backend could not synthesize (missing library or data, unknown voice, engine error)."""


def _check_args(text: str, rate_wpm: int, pitch: int) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not 80 <= rate_wpm <= 450:
        raise ValueError(f"rate_wpm must be in [80, 450] (espeak's range), got {rate_wpm}")
    if not 0 <= pitch <= 99:
        raise ValueError(f"pitch must be in [0, 99] (espeak's range), got {pitch}")


# ----------------------------------------------------------------------------- system binary
def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode the 16-bit PCM WAV espeak-ng writes to stdout (its data size may be a streaming dummy)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthesisError("espeak-ng --stdout did not produce a WAV stream")
    pos, rate, bits, channels = 12, 0, 0, 0
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if tag == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
        elif tag == b"data":
            if bits != 16 or channels != 1:
                raise SynthesisError(
                    f"espeak-ng wrote {bits}-bit {channels}-channel audio, expected 16-bit mono"
                )
            # Streaming writers put a placeholder size; what follows the header is the audio.
            end = min(len(data), body + size) if size else len(data)
            pcm = data[body : end - ((end - body) % 2)]
            return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, rate
        pos = body + size + (size % 2)
    raise SynthesisError("espeak-ng WAV stream has no data chunk")


def _cli_synthesize(text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError("espeak-ng is not on PATH")
    cmd = [exe, "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise SynthesisError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return _parse_wav(proc.stdout)


# ----------------------------------------------------------------------------- espeakng-loader
class _Engine:
    """The eSpeak NG library from the espeakng-loader wheel, initialised once per process."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise SynthesisError(
                "the espeakng-loader package is not installed (pip install espeakng-loader)"
            ) from e
        lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise SynthesisError(f"cannot load the eSpeak NG library {lib_path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # eSpeak NG >= 1.51
        if self._set_seed is not None:
            self._set_seed.argtypes, self._set_seed.restype = [ctypes.c_long], ctypes.c_int
        self._libc_srand = lambda seed: None
        if os.name == "posix":
            self._libc_srand = ctypes.CDLL(None).srand
            self._libc_srand.argtypes, self._libc_srand.restype = [ctypes.c_uint], None
        # The path argument is the folder that holds espeak-ng-data.
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, os.path.dirname(data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise SynthesisError(f"espeak_Initialize failed ({rate}) with data at {data_path}")
        self.lib, self.sample_rate = lib, rate
        self.version = (lib.espeak_Info(None) or b"?").decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: the library holds its pointer
        lib.espeak_SetSynthCallback(self._callback)
        # Load the English dictionary once here, so forked children share it instead of each reading it.
        lib.espeak_SetVoiceByName(b"en")

    def _collect(self, wav, n, _events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate_wpm: int, pitch: int) -> np.ndarray:
        """Synthesize in this process. Returns int16 samples ``[N]`` at ``self.sample_rate``."""
        lib = self.lib
        status = lib.espeak_SetVoiceByName(voice.encode())
        if status != 0:
            why = "unknown voice" if status == _EE_NOT_FOUND else f"error {status}"
            raise SynthesisError(f"espeak_SetVoiceByName({voice!r}): {why}")
        lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
        lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
        # Breathy variants (f2, f3, f5, ...) add noise; Initialize seeds its generator from the clock.
        seed = zlib.crc32(f"{voice}|{text}|{rate_wpm}|{pitch}".encode())
        if self._set_seed is not None:
            self._set_seed(seed)
        self._libc_srand(seed)  # older builds draw from libc's rand()
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != 0:
            raise SynthesisError(f"espeak_Synth({text!r}) failed with status {status}")
        if not self._chunks:
            raise SynthesisError(f"espeak_Synth({text!r}) produced no audio")
        return np.concatenate(self._chunks)


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def _reset_lock_in_child() -> None:
    # A fork taken while another thread held the lock would otherwise deadlock the child.
    global _ENGINE_LOCK
    _ENGINE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


def _engine() -> _Engine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def _in_fresh_child(engine: _Engine, text: str, voice: str, rate_wpm: int, pitch: int) -> np.ndarray:
    """Run ``engine.synth`` in a forked child so that the parent's engine state stays pristine."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesize, send b"O" + int16 bytes or b"E" + message, never return
        code = 1
        try:
            os.close(read_fd)
            try:
                payload = b"O" + engine.synth(text, voice, rate_wpm, pitch).astype("<i2").tobytes()
            except SynthesisError as e:  # reported to the parent, which raises it
                payload = b"E" + str(e).encode()
            except Exception as e:
                payload = b"E" + f"{type(e).__name__}: {e}".encode()
            with os.fdopen(write_fd, "wb") as f:
                f.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as f:
            payload = f.read()
    finally:  # reap the child even when interrupted, so no zombie is left behind
        _, status = os.waitpid(pid, 0)
    if not payload or (payload[:1] == b"O" and status != 0):
        raise SynthesisError(f"the espeak synthesis child for {text!r} died (wait status {status})")
    if payload[:1] == b"E":
        raise SynthesisError(payload[1:].decode(errors="replace"))
    return np.frombuffer(payload[1:], dtype="<i2")


def _library_synthesize(text: str, voice: str, rate_wpm: int, pitch: int) -> tuple[np.ndarray, int]:
    engine = _engine()
    if hasattr(os, "fork"):
        samples = _in_fresh_child(engine, text, voice, rate_wpm, pitch)
    else:  # no fork (Windows): deterministic only for a fixed order of calls in one process
        with _ENGINE_LOCK:
            samples = engine.synth(text, voice, rate_wpm, pitch)
    return samples.astype(np.float32) / 32768.0, engine.sample_rate


# ----------------------------------------------------------------------------- builtin formant synth
# (F1, F2) in Hz for vowel letters, roughly the English vowels they most often spell.
_VOWELS = {
    "a": (730, 1090),
    "e": (530, 1840),
    "i": (270, 2290),
    "o": (570, 840),
    "u": (300, 870),
    "y": (280, 2250),
}
# Voiced sonorants: (F1, F2, relative amplitude).
_SONORANTS = {"m": (250, 1000, 0.35), "n": (250, 1500, 0.35), "r": (420, 1300, 0.6), "l": (360, 1050, 0.6),
              "w": (300, 700, 0.6)}  # fmt: skip
# Fricatives: (low Hz, high Hz, amplitude, voiced).
_FRICATIVES = {"s": (4000, 7500, 0.25, False), "z": (4000, 7500, 0.2, True), "c": (4000, 7500, 0.25, False),
               "x": (3000, 7000, 0.25, False), "f": (1500, 7000, 0.12, False), "v": (1500, 7000, 0.1, True),
               "h": (500, 5000, 0.08, False), "j": (2000, 5000, 0.2, True)}  # fmt: skip
# Stops: burst band (low Hz, high Hz).
_STOPS = {"t": (3000, 7000), "d": (2500, 6000), "k": (1500, 3500), "g": (1200, 3000), "p": (400, 1800),
          "b": (300, 1500), "q": (1500, 3500)}  # fmt: skip


def _segments(text: str) -> list[tuple[str, tuple, float]]:
    """Letters -> ``(kind, params, seconds at 160 wpm)``; a final silent ``e`` and spaces become pauses."""
    segs: list[tuple[str, tuple, float]] = []
    letters = [c for c in text.lower() if c.isalpha() or c == " "]
    for i, c in enumerate(letters):
        nxt = letters[i + 1] if i + 1 < len(letters) else " "
        if c == " ":
            segs.append(("pause", (), 0.12))
        elif c == "e" and nxt == " " and i > 0 and letters[i - 1] not in _VOWELS:
            continue  # English silent e (one, five, nine)
        elif c in _VOWELS:
            segs.append(("vowel", (*_VOWELS[c], 1.0), 0.11))
        elif c in _SONORANTS:
            segs.append(("vowel", _SONORANTS[c], 0.07))
        elif c in _FRICATIVES:
            segs.append(("fric", _FRICATIVES[c], 0.09))
        elif c in _STOPS:
            segs.append(("pause", (), 0.04))
            segs.append(("fric", (*_STOPS[c], 0.3, False), 0.02))
        else:  # any other letter: a short neutral vowel keeps it audible
            segs.append(("vowel", (500, 1500, 0.5), 0.06))
    if not segs:
        raise ValueError(f"builtin synthesizer: nothing to say in {text!r}")
    return segs


def _builtin_synthesize(text: str, voice: str, rate_wpm: int, pitch: int, sample_rate: int) -> np.ndarray:
    """Harmonic (voiced) plus band-limited noise (unvoiced) synthesis. Returns float32 ``[N]``."""
    key = zlib.crc32(f"{voice}|{text}|{rate_wpm}|{pitch}".encode())
    rng = np.random.default_rng(key)
    female = "+f" in voice
    # A speaker's vocal tract length sets its formant scale; the voice name picks a stable one.
    scale = (1.16 if female else 1.0) * (0.94 + 0.12 * (zlib.crc32(voice.encode()) % 1000) / 999)
    f0 = (80.0 + 1.2 * pitch) * (1.7 if female else 1.0)
    stretch = 160.0 / rate_wpm
    segs = _segments(text)
    lengths = [max(1, int(round(s * stretch * sample_rate))) for _, _, s in segs]
    n, pad = sum(lengths), int(0.05 * sample_rate)
    # Per-sample tracks: voicing amplitude, F1, F2, noise. Formants glide between voiced neighbours.
    amp, f1, f2, noise = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    start = 0
    for (kind, params, _), length in zip(segs, lengths):
        sl = slice(start, start + length)
        ramp = np.minimum(
            1.0, np.minimum(np.arange(length) + 1, length - np.arange(length)) / (0.01 * sample_rate)
        )
        if kind == "vowel":
            amp[sl], f1[sl], f2[sl] = params[2] * ramp, params[0] * scale, params[1] * scale
        elif kind == "fric":
            lo, hi, level, voiced = params
            spec = np.fft.rfft(rng.standard_normal(length))
            freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
            spec[(freqs < lo) | (freqs > min(hi, 0.45 * sample_rate))] = 0
            band = np.fft.irfft(spec, length)
            noise[sl] = level * ramp * band / (np.abs(band).max() + 1e-9)
            if voiced:
                amp[sl], f1[sl], f2[sl] = 0.15 * ramp, 250 * scale, 1500 * scale
        start += length
    for track in (f1, f2):  # hold the last formant target through unvoiced gaps, then smooth
        idx = np.where(track > 0, np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        track[:] = track[idx]
        track[track == 0] = 500 * scale
        kernel = np.ones(int(0.015 * sample_rate)) / int(0.015 * sample_rate)
        track[:] = np.convolve(track, kernel, mode="same")
    # f0 falls over the word, as in a statement, with a slow speaker-specific vibrato.
    t = np.arange(n) / sample_rate
    f0_track = f0 * np.linspace(1.1, 0.85, n) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t + key % 7))
    phase = 2 * np.pi * np.cumsum(f0_track) / sample_rate
    voiced = np.zeros(n)
    for h in range(1, int(0.45 * sample_rate / f0_track.min()) + 1):
        hf = h * f0_track
        gain = 1 / (1 + ((hf - f1) / 90) ** 2) + 0.6 / (1 + ((hf - f2) / 130) ** 2)
        voiced += gain * np.where(hf < 0.45 * sample_rate, 1.0, 0.0) * np.sin(h * phase) / h**0.5
    voiced *= amp / (np.abs(voiced).max() + 1e-9)
    out = np.concatenate([np.zeros(pad), voiced + noise, np.zeros(pad)])
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


# ----------------------------------------------------------------------------- selection
def _probe(backend: str) -> bool:
    try:
        if backend == "espeak-ng":
            return shutil.which("espeak-ng") is not None and len(_cli_synthesize("a", "en", 160, 50)[0]) > 0
        if backend == "espeakng-loader":
            _engine()
            return True
    except (SynthesisError, OSError, subprocess.SubprocessError):
        return False
    return backend == "builtin"


@functools.cache
def _auto_backend() -> str:
    return next(b for b in BACKENDS if _probe(b))


def resolve_backend(backend: str = "auto") -> str:
    """The backend ``synthesize(..., backend=backend)`` uses: ``backend`` itself, or the first working one.

    Raises:
        ValueError: an unknown backend name.
    """
    if backend == "auto":
        return _auto_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown TTS backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    return backend


def backend_version(backend: str = "auto") -> str:
    """A version string for provenance (``"espeakng-loader 0.2.4 / eSpeak NG 1.52.0"``, ...)."""
    backend = resolve_backend(backend)
    if backend == "espeak-ng":
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise SynthesisError("espeak-ng is not on PATH")
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else "espeak-ng"
    if backend == "espeakng-loader":
        from importlib.metadata import version

        return f"espeakng-loader {version('espeakng-loader')} / eSpeak NG {_engine().version}"
    return "builtin 1"


def synthesize(
    text: str,
    *,
    voice: str,
    rate_wpm: int = 160,
    pitch: int = 50,
    sample_rate: int = 16000,
    backend: str = "auto",
) -> np.ndarray:
    """Synthesize ``text`` as mono float audio.

    Args:
        text: what to say (a word or a short sentence).
        voice: an espeak voice with an optional variant, e.g. ``"en-us"``, ``"en-gb-scotland"``,
            ``"en-us+f3"``; the builtin backend derives f0 and formant scale from it.
        rate_wpm: speaking rate in words per minute, 80 to 450.
        pitch: base pitch, 0 to 99 (espeak's scale; 50 is the voice's default).
        sample_rate: output rate in Hz; espeak's 22050 Hz audio is resampled with soxr.
        backend: ``"auto"`` (the first working of :data:`BACKENDS`) or one of them.

    Returns:
        float32 audio ``[N]`` in [-1, 1] at ``sample_rate``. The same arguments on the same machine
        give the same samples, whatever was synthesized before.

    Raises:
        ValueError: bad arguments. SynthesisError: the chosen backend failed (e.g. unknown voice).
    """
    _check_args(text, rate_wpm, pitch)
    backend = resolve_backend(backend)
    if backend == "builtin":
        return _builtin_synthesize(text, voice, rate_wpm, pitch, sample_rate)
    fn = _cli_synthesize if backend == "espeak-ng" else _library_synthesize
    audio, rate = fn(text, voice, rate_wpm, pitch)
    return resample(audio, rate, sample_rate)
