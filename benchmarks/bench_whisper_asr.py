"""How well does the frozen Whisper decoder read stage-1 states? WER per padding, pooling and RVQ.

Stage 2's intelligibility metric (``SpeechlessStage`` ``gen_wer`` / ``real_wer``) feeds states to
the frozen Whisper decoder through :class:`models.whisper_asr.WhisperASR`. This script measures the
choices that metric makes, on real speech, with the pretrained Whisper tiny.en:

- ``audio``: Whisper's own transcript of the clip (full 30 s window, nothing cut): the ceiling;
- ``states + silence`` / ``states + zeros``: the stage-1 encoder's states (cut at the audio's end,
  as ``WhisperEncoder`` returns them), the window refilled with the states of a silent window or
  with zeros;
- ``pool 2 + ...``: the same after the encoder's ``pooling=2`` (25 frames/s), undone by repeating;
- ``clip window + silence``: states of ``WhisperEncoder(window="clip")`` (the encoder run at the
  clip's own length, not on a padded 30 s window), refilled with silence;
- ``clip + 1 s of silence``: the same with ``clip_silence_s=1.0`` (each clip's frames also attend
  to 1 s of the silence that follows it, as in the full window; the demo's setting);
- ``RVQ QxK pool p``: after a round trip through a residual VQ trained here for a few hundred
  steps on *other* speech (FSDD clips not scored, and espeak-ng sentences), silence padding.

Corpora: ``../shared/data/english_clips`` (the clips with a transcript), an FSDD subset (digits
of 6 speakers) and espeak-ng sentences (``benchmarks/sentence_corpus.py``, voices not used for the
RVQ). WER/CER are torchmetrics' after Whisper's English normaliser (``stages.metrics``).

    WHISPER_TINY_EN=<folder of the converted HF model> .venv/bin/python benchmarks/bench_whisper_asr.py
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_corpus import VOICES, news_sentences  # noqa: E402
from torchmetrics.text import CharErrorRate, WordErrorRate  # noqa: E402

from demo.tts import synthesize  # noqa: E402
from models.encoders.whisper import _pair_mean  # noqa: E402  (the encoder's own pooling math)
from models.rvq import ResidualVQ  # noqa: E402
from models.whisper_asr import WhisperASR  # noqa: E402
from stages.metrics import normalize_transcript  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def _read(path: Path) -> torch.Tensor:
    import soundfile as sf
    import soxr

    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(1)
    if rate != 16000:
        wave = soxr.resample(wave, rate, 16000)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def corpora(fsdd_per_speaker: int, sentences: int, seed: int) -> tuple[dict[str, list], list[torch.Tensor]]:
    """``{group: [(text, wave)]}`` to score, and the waves the RVQ trains on (none of those scored)."""
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    train: list[torch.Tensor] = []
    if (DATA / "english_clips").exists():
        # 2412-153948-0001's manifest transcript is of another utterance (Whisper hears "It will be
        # seen that I did not succeed in my design, ..."): left out.
        rows = [r for r in _manifest(DATA / "english_clips")
                if r["text"].strip() and r["audio"] != "2412-153948-0001.flac"]
        groups["english_clips"] = [(r["text"], _read(DATA / "english_clips" / r["audio"])) for r in rows]
    if (DATA / "fsdd").exists():
        rows = _manifest(DATA / "fsdd")
        rng.shuffle(rows)
        by_speaker: dict[str, int] = {}
        scored = []
        for r in rows:
            if by_speaker.get(r["speaker"], 0) < fsdd_per_speaker:
                by_speaker[r["speaker"]] = by_speaker.get(r["speaker"], 0) + 1
                scored.append((r["text"], _read(DATA / "fsdd" / r["audio"])))
            elif len(train) < 400:
                train.append(_read(DATA / "fsdd" / r["audio"]))
        groups["fsdd"] = scored
    texts = news_sentences(sentences + 60, seed=seed, min_words=8, max_words=30)
    voice = lambda i: VOICES[i % len(VOICES)]  # noqa: E731
    # Scored sentences in voices 0-1, RVQ training sentences in voices 2-5 (other text, other voices).
    groups["espeak_sentences"] = [
        (t, torch.from_numpy(synthesize(t, voice=voice(i % 2)[0], pitch=voice(i % 2)[1], rate_wpm=voice(i % 2)[2])))
        for i, t in enumerate(texts[:sentences])
    ]
    for i, t in enumerate(texts[sentences:]):
        v = VOICES[2 + i % 4]
        train.append(torch.from_numpy(synthesize(t, voice=v[0], pitch=v[1], rate_wpm=v[2])))
    return groups, train


def _windows(asr: WhisperASR, waves: list[torch.Tensor], batch: int = 8) -> list[torch.Tensor]:
    """Full-window encoder states ``[W, D]`` per clip (clips longer than a window are cut)."""
    out = []
    n = asr.extractor.n_samples
    for i in range(0, len(waves), batch):
        out += list(asr.encode([w[:n] for w in waves[i : i + batch]]).cpu())
    return out


def _frames(wave: torch.Tensor, window: int) -> int:
    return min(window, -(-wave.shape[0] // 320))


def _packed(waves: list[torch.Tensor], seconds: float) -> list[torch.Tensor]:
    """Concatenate short clips into pieces of about ``seconds``: many frames per 30 s encoder call."""
    out, cur = [], []
    for w in waves:
        cur.append(w)
        if sum(x.shape[0] for x in cur) >= seconds * 16000:
            out.append(torch.cat(cur))
            cur = []
    return out + ([torch.cat(cur)] if cur else [])


def train_rvq(frames: torch.Tensor, *, q: int, k: int, steps: int, seed: int) -> ResidualVQ:
    """An EMA RVQ over ``frames [N, D]`` (k-means init, ``steps`` batches of 2048 frames)."""
    rvq = ResidualVQ(dim=frames.shape[1], num_quantizers=q, codebook_size=k,
                     kmeans_buffer_frames=min(len(frames), 8192), seed=seed).train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(frames), (2048,), generator=g)
        rvq(frames[idx][None])
    return rvq.eval()


def _score(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    h = [normalize_transcript(x, "en") for x in hyps]
    r = [normalize_transcript(x, "en") for x in refs]
    return float(WordErrorRate()(h, r)), float(CharErrorRate()(h, r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("WHISPER_TINY_EN"), help="HF Whisper folder")
    parser.add_argument("--fsdd-per-speaker", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--rvq", default="8x256", help="QxK of the quickly trained RVQ")
    parser.add_argument("--rvq-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=2, help="transcripts printed per group and variant")
    parser.add_argument("--skip-rvq", action="store_true", help="leave out the RVQ round trips")
    args = parser.parse_args(argv)
    if not args.model or not Path(args.model, "config.json").exists():
        print("needs a Whisper tiny.en folder: --model DIR or WHISPER_TINY_EN=DIR")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    asr = WhisperASR(source=args.model)
    groups, train_waves = corpora(args.fsdd_per_speaker, args.sentences, args.seed)
    win = asr.window
    states = {g: _windows(asr, [w for _, w in items]) for g, items in groups.items()}
    frames = {g: [_frames(w, win) for _, w in items] for g, items in groups.items()}
    train_states = _windows(asr, _packed(train_waves, 28.0))
    train_frames = [min(win, -(-w.shape[0] // 320)) for w in _packed(train_waves, 28.0)]
    print(f"{args.threads} threads; encoded {sum(map(len, states.values())) + len(train_states)} windows "
          f"in {time.perf_counter() - t0:.0f} s; groups: " + ", ".join(f"{g} {len(v)}" for g, v in groups.items()))

    q, k = (int(x) for x in args.rvq.split("x"))
    rvqs = {}
    for pooling in () if args.skip_rvq else (1, 2):
        cut = [s[:n] for s, n in zip(train_states, train_frames, strict=True)]
        if pooling == 2:
            cut = [_pair_mean(c[None], torch.tensor([c.shape[0]]))[0][0] for c in cut]
        t = time.perf_counter()
        rvqs[pooling] = train_rvq(torch.cat(cut), q=q, k=k, steps=args.rvq_steps, seed=args.seed)
        print(f"RVQ {q}x{k} pool {pooling}: {sum(c.shape[0] for c in cut)} training frames, {time.perf_counter() - t:.0f} s")

    from models.encoders import WhisperEncoder

    clip_encoder = WhisperEncoder(source=args.model, window="clip")
    clip_states = {g: [clip_encoder(w[None]).states[0] for _, w in items] for g, items in groups.items()}
    clip_encoder.clip_silence_s = 1.0
    clip1_states = {g: [clip_encoder(w[None]).states[0] for _, w in items] for g, items in groups.items()}

    def variant(group: str, pooling: int, padding: str, rvq: ResidualVQ | None, clip: str = "") -> list[str]:
        asr.pooling, asr.padding = pooling, padding
        source = {"": states, "clip": clip_states, "clip1": clip1_states}[clip][group]
        cut = [s[:n] for s, n in zip(source, frames[group], strict=True)]
        lengths = torch.tensor(frames[group])
        x = torch.nn.utils.rnn.pad_sequence(cut, batch_first=True)
        if pooling == 2:
            x, lengths = _pair_mean(x, lengths)
        if rvq is not None:
            mask = torch.arange(x.shape[1])[None] < lengths[:, None]
            x = rvq.decode(rvq.encode(x, mask))
        return asr.transcribe_states(x, lengths)

    rows = [("audio (full window)", None)]
    for pooling in (1, 2):
        for padding in ("silence", "zeros"):
            rows.append((f"{'states' if pooling == 1 else 'pool 2'} + {padding}", (pooling, padding, None)))
    rows.append(("clip window + silence", (1, "silence", None, "clip")))
    rows.append(("clip + 1 s of silence", (1, "silence", None, "clip1")))
    for pooling in rvqs:
        rows.append((f"RVQ {q}x{k} pool {pooling} + silence", (pooling, "silence", rvqs[pooling])))
    print(f"\n{'variant':<28}" + "".join(f"{g + ' WER/CER':>28}" for g in groups) + f"{'s':>6}")
    examples = []
    for label, spec in rows:
        t = time.perf_counter()
        cells = []
        for g, items in groups.items():
            if spec is None:
                hyps = asr.decode(torch.stack(states[g]), torch.tensor(frames[g]))
            else:
                hyps = variant(g, *spec)
            wer, cer = _score(hyps, [t for t, _ in items])
            cells.append(f"{wer:>19.3f} / {cer:.3f}")
            examples += [(label, g, ref, hyp) for (ref, _), hyp in list(zip(items, hyps, strict=True))[: args.show]]
        print(f"{label:<28}" + "".join(f"{c:>28}" for c in cells) + f"{time.perf_counter() - t:>6.0f}", flush=True)
    print()
    for label, g, ref, hyp in examples:
        print(f"[{label} | {g}] ref: {ref[:70]!r}\n{'':>8}hyp: {hyp[:70]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
