"""Benchmark: Whisper's encoder on the full 30 s window vs on the clip's real length.

``models.encoders.WhisperEncoder(window="full")`` pads every clip to Whisper's 30 s window (what the
model was trained on); ``window="clip"`` runs it on the clip's own length with a padding mask. This
script measures, in one run, on real clips (``../shared/data``: ``english_clips`` and FSDD digits;
synthetic noise bursts if absent):

- time: both modes over the same clips (feature extraction included), with 1 and 2 torch threads,
  median of ``--repeats`` runs after one warm-up, and the ratio full / clip;
- how far the states move: per-frame cosine between the two modes over the real frames (mean and
  5th percentile over all frames) and the cosine of the utterance means (pooled);
- with a pretrained model only: spoken-digit classification by nearest class centroid of the
  utterance-mean states, FSDD's 5 other speakers for the centroids, ``yweweler`` held out, in both
  modes (accuracy with Euclidean and with cosine distance), to show whether the clip-length states
  still serve tokenizing.

The model is ``--model DIR`` (a Hugging Face Whisper folder; default ``../models/whisper-tiny.en``
beside the repository). Without it a random-weight tiny.en-shaped config is used and the output says
so: the times still hold (same shapes), the state changes and classification mean nothing.

    .venv/bin/python benchmarks/bench_whisper_length.py
    .venv/bin/python benchmarks/bench_whisper_length.py --model DIR --threads 1,2 --train-per-digit 10
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import WhisperConfig  # noqa: E402

from datamodules.audio import AudioDecodeError, load_audio, resample  # noqa: E402
from models.encoders import WhisperEncoder  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
HELD_OUT = "yweweler"


def _tiny_en_config() -> WhisperConfig:
    """whisper-tiny.en's shapes (4 layers, 384 wide, 6 heads, 30 s window) with random weights."""
    return WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_layers=4,
        decoder_attention_heads=6,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
    )


def _read(path: Path) -> torch.Tensor | None:
    try:
        wave, rate, _ = load_audio(path)
    except (AudioDecodeError, FileNotFoundError) as err:
        print(f"  skipped {path.name}: {err}")
        return None
    return torch.from_numpy(resample(wave, rate, SR)).float()


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _fsdd(data: Path, per_digit: dict[str, int]) -> list[tuple[str, int, torch.Tensor]]:
    """``(speaker, digit, wave)`` for the first ``per_digit[speaker or "*"]`` takes of each digit."""
    rows = _manifest(data / "fsdd")
    out = []
    for row in rows:
        stem = Path(row["audio"]).stem  # "<digit>_<speaker>_<take>"
        digit, speaker, take = stem.split("_")
        if int(take) < per_digit.get(speaker, per_digit["*"]):
            wave = _read(data / "fsdd" / row["audio"])
            if wave is not None:
                out.append((speaker, int(digit), wave))
    return out


def _batches(waves: list[torch.Tensor], batch: int):
    for i in range(0, len(waves), batch):
        group = waves[i : i + batch]
        lengths = torch.tensor([len(w) for w in group])
        yield torch.nn.utils.rnn.pad_sequence(group, batch_first=True), lengths


def _encode(enc: WhisperEncoder, waves: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    states = []
    for audio, lengths in _batches(waves, batch):
        out = enc(audio, lengths)
        states += [out.states[b, : int(t)] for b, t in enumerate(out.lengths)]
    return states


def _time(
    encs: dict[str, WhisperEncoder], waves: list[torch.Tensor], batch: int, repeats: int
) -> dict[str, float]:
    """Median seconds per mode over ``waves``; modes interleaved so load on the machine hits both."""
    runs: dict[str, list[float]] = {m: [] for m in encs}
    for r in range(repeats + 1):
        for mode, enc in encs.items():
            start = time.perf_counter()
            _encode(enc, waves, batch)
            if r:  # the first round warms up
                runs[mode].append(time.perf_counter() - start)
    return {m: statistics.median(v) for m, v in runs.items()}


def _state_change(full: list[torch.Tensor], clip: list[torch.Tensor]) -> tuple[float, float, float]:
    """Per-frame cosine (mean, 5th percentile over all frames) and mean pooled cosine, full vs clip."""
    frames = torch.cat([F.cosine_similarity(a, b, dim=-1) for a, b in zip(full, clip)])
    pooled = torch.stack([F.cosine_similarity(a.mean(0), b.mean(0), dim=0) for a, b in zip(full, clip)])
    return frames.mean().item(), torch.quantile(frames, 0.05).item(), pooled.mean().item()


def _centroid_accuracy(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor
) -> tuple[float, float]:
    """Nearest-class-centroid accuracy of pooled states ``[N, D]``: (Euclidean, cosine)."""
    classes = train_y.unique()
    centroids = torch.stack([train[train_y == c].mean(0) for c in classes])  # [C, D]
    euclid = classes[torch.cdist(test, centroids).argmin(1)]
    cosine = classes[(F.normalize(test, dim=-1) @ F.normalize(centroids, dim=-1).T).argmax(1)]
    return (euclid == test_y).float().mean().item(), (cosine == test_y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=str(ROOT.parent / "models" / "whisper-tiny.en"),
        help="Hugging Face Whisper folder (default: ../models/whisper-tiny.en)",
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--timing-fsdd", type=int, default=20, help="FSDD clips timed (all digits and speakers)"
    )
    parser.add_argument("--batch", type=int, default=16, help="batch size of the batched FSDD timing")
    parser.add_argument(
        "--train-per-digit", type=int, default=10, help="takes per digit per training speaker"
    )
    parser.add_argument(
        "--test-per-digit", type=int, default=50, help="takes per digit of the held-out speaker"
    )
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    data, model = Path(args.data), Path(args.model)

    pretrained = (model / "config.json").exists()
    if pretrained:
        full = WhisperEncoder(source=str(model))
        clip = WhisperEncoder(source=str(model), window="clip")
        print(f"model: pretrained Whisper from {model} (d_model {full.dim})")
    else:
        torch.manual_seed(0)
        full = WhisperEncoder(config=_tiny_en_config())
        clip = WhisperEncoder(config=_tiny_en_config(), window="clip")
        print(
            f"model: RANDOM weights, whisper-tiny.en shapes (no model at {model}): times hold, "
            "state changes are those of a random network, no classification"
        )
    clip._set_model(full.model)  # one network behind both modes
    encs = {"full": full, "clip": clip}

    sets: dict[str, tuple[list[torch.Tensor], int]] = {}
    if (data / "english_clips" / "manifest.tsv").exists() and (data / "fsdd" / "manifest.tsv").exists():
        print(f"data: {data}")
        english = [
            w
            for w in (_read(data / "english_clips" / r["audio"]) for r in _manifest(data / "english_clips"))
            if w is not None
        ]
        first_takes = [w for _, _, w in _fsdd(data, {"*": 1})]  # 60: each digit by each speaker
        fsdd = first_takes[:: max(1, len(first_takes) // args.timing_fsdd)][: args.timing_fsdd]
        sets["english_clips b1"] = (english, 1)
        sets["fsdd b1"] = (fsdd, 1)
        sets[f"fsdd b{args.batch}"] = (fsdd, args.batch)
    else:
        print(f"data: SYNTHETIC noise bursts (no {data}/english_clips and fsdd)")
        g = torch.Generator().manual_seed(0)
        synth = [
            0.1 * torch.randn(int(s * SR), generator=g) for s in (0.5, 0.8, 1.2, 2.0, 3.5, 6.0, 11.0, 16.0)
        ]
        sets["synthetic b1"] = (synth, 1)
        sets[f"synthetic b{args.batch}"] = (synth, args.batch)

    print(f"\ntime (median of {args.repeats} runs; feature extraction included)")
    print(
        f"{'threads':>7} | {'set':<18} | {'clips':>5} | {'audio s':>7} | {'full s':>7} | {'clip s':>7} | {'full/clip':>9}"
    )
    for n in threads:
        torch.set_num_threads(n)
        for name, (waves, batch) in sets.items():
            t = _time(encs, waves, batch, args.repeats)
            audio_s = sum(len(w) for w in waves) / SR
            print(
                f"{n:>7} | {name:<18} | {len(waves):>5} | {audio_s:>7.1f} | {t['full']:>7.3f} | "
                f"{t['clip']:>7.3f} | {t['full'] / t['clip']:>8.1f}x"
            )

    # One thread for the rest (the fastest here on a shared CPU; the states do not depend on it).
    torch.set_num_threads(min(threads))
    print("\nstates, full vs clip (cosine over real frames; pooled = cosine of utterance means)")
    print(f"{'set':<18} | {'frame mean':>10} | {'frame p5':>8} | {'pooled':>7}")
    for name, (waves, _) in sets.items():
        if name.endswith(" b1"):
            mean, p5, pooled = _state_change(_encode(full, waves, 1), _encode(clip, waves, 1))
            print(f"{name.removesuffix(' b1'):<18} | {mean:>10.4f} | {p5:>8.4f} | {pooled:>7.4f}")

    if not pretrained or "fsdd b1" not in sets:
        print("\ndigit classification: skipped (needs a pretrained --model and FSDD)")
        return 0
    rows = _fsdd(data, {"*": args.train_per_digit, HELD_OUT: args.test_per_digit})
    waves = [w for _, _, w in rows]
    labels = torch.tensor([d for _, d, _ in rows])
    test = torch.tensor([s == HELD_OUT for s, _, _ in rows])
    print(
        f"\ndigits: nearest class centroid of utterance-mean states; centroids from 5 speakers x "
        f"{args.train_per_digit} takes per digit ({int((~test).sum())} clips), test {HELD_OUT} "
        f"({int(test.sum())} clips), {min(threads)} thread(s), batch 1"
    )
    print(f"{'window':<6} | {'euclid':>6} | {'cosine':>6} | {'encode s':>8}")
    for mode, enc in encs.items():
        start = time.perf_counter()
        # Batch 1: on a CPU a batch of full windows is no faster per clip (the 1500 x 1500
        # attention dominates), and both modes give the same states whatever the batch.
        pooled = torch.stack([s.mean(0) for s in _encode(enc, waves, 1)])
        seconds = time.perf_counter() - start
        acc_e, acc_c = _centroid_accuracy(pooled[~test], labels[~test], pooled[test], labels[test])
        print(f"{mode:<6} | {acc_e:>6.3f} | {acc_c:>6.3f} | {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
