"""The embedded demo corpus: synthesized spoken digits from many voices, and a closed instruction task.

Follows the Free Spoken Digit Dataset (the ten English digit words spoken in isolation, several takes
per speaker, text = the word), so configs written for ``../shared/data/fsdd`` run on it unchanged, but
is generated in seconds on any machine with :mod:`demo.tts` (eSpeak NG voices and variants as
speakers, small rate/pitch jitter between takes). Speakers are split disjointly into train/val/test,
so held-out numbers measure generalisation to unseen voices.

The text side is the closed task the demo's stage 3 learns: "a spoken number -> the next number",
modulo ten (``"nine" -> "zero"``, :mod:`demo.tasks`), so every answer stays inside the ten-word vocabulary.

Layout written under ``out_dir``::

    wav/<speaker>/<digit>_<speaker>_<take>.wav   16 kHz mono PCM_16
    manifest.tsv                                  audio text speaker language split (all clips)
    manifest_{train,val,test}.tsv                 the same rows, one file per split
    speakers.tsv                                  speaker voice pitch rate_wpm split
    instructions_{train,val,test}.jsonl           {"id", "instruction", "response", "audio", "speaker"}
    text_instructions.jsonl                       text-only pairs ("What comes after seven?" -> "eight")
    corpus.json                                   backend, voices, counts, seconds, seed (written last)

Everything is a function of the arguments (and the backend's version): a second build writes
byte-identical files, and a build whose ``corpus.json`` matches and whose files all exist is skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.shards import atomic_write_text
from demo.tasks import DIGITS, next_digit, previous_digit
from demo.tts import backend_version, resolve_backend, synthesize

__all__ = [
    "SPEAKER_RECIPES",
    "Speaker",
    "build_demo_corpus",
    "main",
    "make_speakers",
]

MANIFEST_HEADER = ("audio", "text", "speaker", "language", "split")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1

# (espeak voice+variant, base pitch 0-99, base rate in words/min): accents x variants x pitch x rate.
SPEAKER_RECIPES: tuple[tuple[str, int, int], ...] = (
    ("en-us", 50, 165),
    ("en-us+f3", 55, 170),
    ("en+m3", 40, 150),
    ("en+f2", 60, 160),
    ("en-gb-scotland", 45, 155),
    ("en-029+f1", 50, 175),
    ("en-gb-x-rp+m1", 35, 160),
    ("en-us-nyc+f4", 65, 150),
    ("en-gb-x-gbclan+m2", 55, 145),
    ("en-gb-x-gbcwmd+f5", 45, 165),
    ("en-us+m7", 30, 155),
    ("en+f3", 70, 170),
    ("en-gb-scotland+f2", 55, 160),
    ("en-029+m4", 45, 150),
    ("en-gb-x-rp+f1", 60, 175),
    ("en-us-nyc+m5", 40, 165),
)
_RATE_JITTER = 0.08  # takes spread evenly over +-8 % of the speaker's rate
_PITCH_JITTER = 4  # and up to +-4 on espeak's 0-99 pitch scale


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a voice recipe and the split it belongs to."""

    name: str
    voice: str
    pitch: int
    rate_wpm: int
    split: str


def make_speakers(n_speakers: int = 12, *, n_val: int = 2, n_test: int = 2, seed: int = 0) -> list[Speaker]:
    """The first ``n_speakers`` recipes, named ``spk00``.., with a seeded speaker-disjoint split.

    Raises:
        ValueError: too many speakers, or a split that leaves no training speaker.
    """
    if not 1 <= n_speakers <= len(SPEAKER_RECIPES):
        raise ValueError(f"n_speakers must be in [1, {len(SPEAKER_RECIPES)}], got {n_speakers}")
    if n_val < 0 or n_test < 0 or n_val + n_test >= n_speakers:
        raise ValueError(
            f"{n_speakers} speakers cannot give {n_val} val + {n_test} test and >= 1 train speaker"
        )
    order = np.random.default_rng([seed, 1]).permutation(n_speakers)
    split = {int(i): "test" for i in order[:n_test]} | {int(i): "val" for i in order[n_test : n_test + n_val]}
    return [
        Speaker(f"spk{i:02d}", voice, pitch, rate, split.get(i, "train"))
        for i, (voice, pitch, rate) in enumerate(SPEAKER_RECIPES[:n_speakers])
    ]


def _jobs(speakers: list[Speaker], takes: int, seed: int) -> list[dict[str, Any]]:
    """One job per clip, in manifest order, with deterministic per-take rate and pitch."""
    jobs = []
    for s_ix, spk in enumerate(speakers):
        for d_ix, word in enumerate(DIGITS):
            rng = np.random.default_rng([seed, s_ix, d_ix])
            # Evenly spread rates guarantee that no two takes are identical.
            factors = rng.permutation(np.linspace(-_RATE_JITTER, _RATE_JITTER, takes) if takes > 1 else [0.0])
            pitches = rng.integers(-_PITCH_JITTER, _PITCH_JITTER + 1, size=takes)
            for take in range(takes):
                key = f"{d_ix}_{spk.name}_{take}"
                jobs.append(
                    {
                        "key": key,
                        "audio": f"wav/{spk.name}/{key}.wav",
                        "text": word,
                        "speaker": spk.name,
                        "split": spk.split,
                        "voice": spk.voice,
                        "rate_wpm": int(round(spk.rate_wpm * (1 + factors[take]))),
                        "pitch": int(np.clip(spk.pitch + pitches[take], 0, 99)),
                    }
                )
    return jobs


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit mono WAV via the stdlib writer (no timestamps or tool chunks: byte-reproducible)."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def _render(args: tuple[dict[str, Any], str, str, int]) -> tuple[str, int]:
    """Synthesize and write one clip. Returns ``(key, n_samples)``."""
    job, out_dir, backend, sample_rate = args
    audio = synthesize(
        job["text"], voice=job["voice"], rate_wpm=job["rate_wpm"], pitch=job["pitch"],
        sample_rate=sample_rate, backend=backend,
    )  # fmt: skip
    if len(audio) < 0.1 * sample_rate or np.abs(audio).max() < 1e-3:
        raise RuntimeError(
            f"{backend} produced {len(audio)} near-silent samples for {job['key']} ({job['voice']})"
        )
    _write_wav(Path(out_dir) / job["audio"], audio, sample_rate)
    return job["key"], len(audio)


def _tsv(rows: list[tuple]) -> str:
    return "".join("\t".join(str(v) for v in row) + "\n" for row in rows)


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def text_instructions() -> list[dict[str, str]]:
    templates = (
        ("after", "What comes after {w}?", next_digit),
        ("follows", "Which number follows {w}?", next_digit),
        ("before", "What comes before {w}?", previous_digit),
    )
    return [
        {"id": f"text-{name}-{w}", "instruction": tpl.format(w=w), "response": answer(w)}
        for name, tpl, answer in templates
        for w in DIGITS
    ]


def _remove_stale(out: Path, keep: set[str]) -> int:
    """Delete clips of an earlier, different build so the folder matches the manifest exactly."""
    removed = 0
    for path in sorted((out / "wav").glob("*/*.wav")):
        if path.relative_to(out).as_posix() not in keep:
            path.unlink()
            removed += 1
    for tmp in (out / "wav").glob("*/.*.wav.tmp-*"):  # left by an interrupted earlier build
        tmp.unlink()
    for folder in sorted((out / "wav").glob("*")):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def build_demo_corpus(
    out_dir: str | os.PathLike,
    *,
    n_speakers: int = 12,
    takes: int = 4,
    n_val: int = 2,
    n_test: int = 2,
    seed: int = 0,
    backend: str = "auto",
    sample_rate: int = 16000,
    workers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build (or reuse) the demo corpus under ``out_dir``.

    Args:
        out_dir: output folder (created).
        n_speakers: how many of :data:`SPEAKER_RECIPES` to use (at most 16).
        takes: clips per speaker and digit, each with its own rate/pitch jitter.
        n_val, n_test: speakers held out for validation and test; the rest train.
        seed: picks the split and the per-take jitter.
        backend: TTS backend (``"auto"``, ``"espeak-ng"``, ``"espeakng-loader"``, ``"builtin"``).
        sample_rate: output rate in Hz.
        workers: synthesis processes; ``None`` = up to 4 (as many as CPUs), 1 = in this process.
        force: rebuild even when an identical corpus is already there.

    Returns:
        The ``corpus.json`` contents plus ``out_dir``, ``reused`` (bool) and ``build_seconds``.
    """
    if takes < 1:
        raise ValueError(f"takes must be >= 1, got {takes}")
    start = time.perf_counter()
    out = Path(out_dir)
    speakers = make_speakers(n_speakers, n_val=n_val, n_test=n_test, seed=seed)
    backend = resolve_backend(backend)
    params = {
        "format_version": FORMAT_VERSION, "n_speakers": n_speakers, "takes": takes, "n_val": n_val,
        "n_test": n_test, "seed": seed, "backend": backend, "backend_version": backend_version(backend),
        "sample_rate": sample_rate,
    }  # fmt: skip
    jobs = _jobs(speakers, takes, seed)
    text_files = ["manifest.tsv", "speakers.tsv", "text_instructions.jsonl"]
    text_files += [f"manifest_{s}.tsv" for s in SPLITS] + [f"instructions_{s}.jsonl" for s in SPLITS]

    meta_path = out / "corpus.json"
    if not force and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        complete = all((out / f).exists() for f in text_files) and all(
            (out / j["audio"]).exists() for j in jobs
        )
        if meta.get("params") == params and complete:
            return {**meta, "out_dir": str(out), "reused": True, "build_seconds": time.perf_counter() - start}
    meta_path.unlink(missing_ok=True)  # a half-rebuilt folder must not look complete

    tasks = [(job, str(out), backend, sample_rate) for job in jobs]
    n_workers = min(4, os.cpu_count() or 1) if workers is None else max(1, workers)
    if n_workers > 1 and len(tasks) > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(n_workers) as pool:
            lengths = dict(pool.map(_render, tasks, chunksize=max(1, len(tasks) // (4 * n_workers))))
    else:
        lengths = dict(map(_render, tasks))
    stale = _remove_stale(out, {j["audio"] for j in jobs})

    rows = {s: [j for j in jobs if j["split"] == s] for s in SPLITS}
    for split in SPLITS:
        manifest = [(j["audio"], j["text"], j["speaker"], "en", j["split"]) for j in rows[split]]
        atomic_write_text(out / f"manifest_{split}.tsv", _tsv([MANIFEST_HEADER, *manifest]))
        instructions = [
            {"id": j["key"], "instruction": j["text"], "response": next_digit(j["text"]), "audio": j["audio"],
             "speaker": j["speaker"]}
            for j in rows[split]
        ]  # fmt: skip
        atomic_write_text(out / f"instructions_{split}.jsonl", _jsonl(instructions))
    manifest = [(j["audio"], j["text"], j["speaker"], "en", j["split"]) for j in jobs]
    atomic_write_text(out / "manifest.tsv", _tsv([MANIFEST_HEADER, *manifest]))
    speaker_rows = [(s.name, s.voice, s.pitch, s.rate_wpm, s.split) for s in speakers]
    atomic_write_text(
        out / "speakers.tsv", _tsv([("speaker", "voice", "pitch", "rate_wpm", "split"), *speaker_rows])
    )
    atomic_write_text(out / "text_instructions.jsonl", _jsonl(text_instructions()))

    seconds = {s: round(sum(lengths[j["key"]] for j in rows[s]) / sample_rate, 3) for s in SPLITS}
    meta = {
        "params": params,
        "backend": backend,
        "backend_version": params["backend_version"],
        "sample_rate": sample_rate,
        "language": "en",
        "words": list(DIGITS),
        "task": "spoken digit -> next digit, modulo ten (nine -> zero)",
        "speakers": [asdict(s) for s in speakers],
        "splits": {s: [spk.name for spk in speakers if spk.split == s] for s in SPLITS},
        "clips": {"total": len(jobs), **{s: len(rows[s]) for s in SPLITS}},
        "seconds": {"total": round(sum(seconds.values()), 3), **seconds},
        "seed": seed,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    elapsed = time.perf_counter() - start
    return {**meta, "out_dir": str(out), "reused": False, "stale_removed": stale, "build_seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    """``speechless-demo-corpus --out data/demo/raw``: build the demo corpus and print a summary."""
    parser = argparse.ArgumentParser(prog="speechless-demo-corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/demo/raw", help="output folder (default: %(default)s)")
    parser.add_argument("--speakers", type=int, default=12, help=f"voices, at most {len(SPEAKER_RECIPES)}")
    parser.add_argument("--takes", type=int, default=4, help="clips per speaker and digit")
    parser.add_argument("--val-speakers", type=int, default=2)
    parser.add_argument("--test-speakers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "espeak-ng", "espeakng-loader", "builtin"]
    )
    parser.add_argument("--workers", type=int, default=None, help="synthesis processes (default: up to 4)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical corpus exists")
    args = parser.parse_args(argv)
    try:
        summary = build_demo_corpus(
            args.out, n_speakers=args.speakers, takes=args.takes, n_val=args.val_speakers,
            n_test=args.test_speakers, seed=args.seed, backend=args.backend, workers=args.workers,
            force=args.force,
        )  # fmt: skip
    except (ValueError, RuntimeError) as e:  # SynthesisError is a RuntimeError
        print(f"speechless-demo-corpus: {e}", file=sys.stderr)
        return 1
    clips, secs = summary["clips"], summary["seconds"]
    state = "already built, reused" if summary["reused"] else f"built in {summary['build_seconds']:.1f} s"
    print(
        f"{summary['out_dir']}: {clips['total']} clips, {secs['total']:.1f} s of audio "
        f"(train {clips['train']} / val {clips['val']} / test {clips['test']}), "
        f"backend {summary['backend_version']}, {state}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
