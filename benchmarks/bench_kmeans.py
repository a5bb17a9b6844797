"""Benchmark: our mini-batch k-means (``models.kmeans.KMeansUnits``) vs scikit-learn's ``MiniBatchKMeans``.

Both fit the same frames with the same ``K``, batch size, k-means++ sample size (scikit-learn's
``init_size``, our ``init_frames``: 3 batches, its default), reassignment ratio (0.01) and number of
frames seen (``--epochs`` passes; scikit-learn without early stopping), in one run, interleaved per
seed so that load from other processes on a shared machine hits both. Printed per ``K``:

- inertia ratio ours / scikit-learn (mean squared distance of a frame to its centroid, both scored
  by the same fp32 function) on the training frames and on a held-out speaker's frames (< 1: ours
  is tighter), mean over ``--seeds`` seeds, with the per-seed figures;
- fit time ratio ours / scikit-learn (median over seeds; < 1: ours is faster), both at
  ``--threads`` threads (torch's intra-op threads; scikit-learn's OpenMP/BLAS via threadpoolctl).

Data: real encoder states, Whisper tiny.en's encoder as ``configs/demo/whisper_stage1_kmeans.yaml``
runs it (2x pooling to 25 frames/s, the clip's length plus 1 s of silence) over FSDD
(``../shared/data/fsdd``: 5 speakers for training, ``yweweler`` held out). The model is ``--model DIR``
(default: ``../models/whisper-tiny.en`` beside the repository, else ``data/models/whisper-tiny.en``,
else the ``pretrained`` extra's converted copy). Without the model or the recordings it falls back
to clustered synthetic frames (``K`` Gaussian blobs in 384 dims) and says so.

    .venv/bin/python benchmarks/bench_kmeans.py                     # needs the dev extra (scikit-learn)
    .venv/bin/python benchmarks/bench_kmeans.py --k 128,512 --threads 1 --seeds 3 --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from datamodules.audio import AudioDecodeError, load_audio, resample  # noqa: E402
from models import vq_math  # noqa: E402
from models.kmeans import KMeansUnits  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = "yweweler"


def _model_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    for folder in (ROOT.parent / "models" / "whisper-tiny.en", ROOT / "data" / "models" / "whisper-tiny.en"):
        if (folder / "config.json").exists():
            return folder
    from models.pretrained_whisper import pretrained_whisper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pretrained_whisper()


def _fsdd_states(model: Path, data: Path, per_digit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[N, 384]`` of the 5 training speakers and of the held-out one."""
    from models.encoders import WhisperEncoder

    encoder = WhisperEncoder(source=str(model), pooling=2, window="clip", clip_silence_s=1.0)
    with open(data / "fsdd" / "manifest.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    frames: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for row in rows:
        _digit, speaker, take = Path(row["audio"]).stem.split("_")
        if int(take) >= per_digit:
            continue
        try:
            wave, rate, _ = load_audio(data / "fsdd" / row["audio"])
        except (AudioDecodeError, FileNotFoundError) as err:
            print(f"  skipped {row['audio']}: {err}")
            continue
        audio = torch.from_numpy(resample(wave, rate, 16000)).float()[None]
        out = encoder(audio, torch.tensor([audio.shape[1]]))
        frames[speaker == HELD_OUT].append(out.states[0, : int(out.lengths[0])])
    return torch.cat(frames[False]), torch.cat(frames[True])


def _synthetic(k: int, n: int, dim: int = 384) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(k, dim, generator=g) * 2

    def draw(m):
        return centers[torch.randint(k, (m,), generator=g)] + torch.randn(m, dim, generator=g)
    return draw(n), draw(n // 5)


def _inertia(frames: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(vq_math.nearest_code(frames, centroids)[1].mean())


def _ours(frames: torch.Tensor, k: int, batch: int, steps: int, init: int, seed: int) -> tuple[torch.Tensor, float]:
    km = KMeansUnits(dim=frames.shape[1], codebook_size=k, init_frames=init, seed=seed).train()
    order = torch.randperm(frames.shape[0], generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % frames.shape[0]]
        km(frames[idx][None])
    return km.centroids.clone(), time.perf_counter() - start


def _sklearn(frames: np.ndarray, k: int, batch: int, epochs: int, init: int, seed: int) -> tuple[torch.Tensor, float]:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, batch_size=batch, init_size=init, max_iter=epochs, n_init=1,
                            max_no_improvement=None, tol=0.0, reassignment_ratio=0.01, compute_labels=False,
                            random_state=seed)
    start = time.perf_counter()
    model.fit(frames)
    return torch.from_numpy(model.cluster_centers_).float(), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hugging Face Whisper folder (default: see the docstring)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--per-digit", type=int, default=20, help="FSDD takes per digit and speaker")
    parser.add_argument("--k", default="128,512", help="comma-separated unit counts")
    parser.add_argument("--batch", type=int, default=1024, help="frames per mini-batch (scikit-learn's default)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the frames")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    model, data = _model_dir(args.model), Path(args.data)
    if model is not None and (data / "fsdd" / "manifest.tsv").exists():
        train, held = _fsdd_states(model, data, args.per_digit)
        source = f"Whisper tiny.en encoder states (25 frames/s) of FSDD, {HELD_OUT} held out"
    else:
        train, held = _synthetic(max(ks), 20000)
        source = "NOTE: clustered SYNTHETIC frames (no Whisper tiny.en or no ../shared/data/fsdd)"
    steps = args.epochs * train.shape[0] // args.batch
    init = 3 * args.batch
    print(f"data: {source}: {train.shape[0]} training frames, {held.shape[0]} held-out, dim {train.shape[1]}")
    print(f"fit: batch {args.batch}, {steps} steps ({args.epochs} epochs), k-means++ on {init} frames, "
          f"{args.threads} thread(s) for both, {args.seeds} seeds")
    train_np = train.numpy().astype(np.float32)
    for k in ks:
        rows = []
        for seed in range(args.seeds):
            with threadpool_limits(limits=args.threads):
                ours, t_ours = _ours(train, k, args.batch, steps, max(init, k), seed)
                theirs, t_theirs = _sklearn(train_np, k, args.batch, args.epochs, max(init, k), seed)
            rows.append((_inertia(train, ours) / _inertia(train, theirs), _inertia(held, ours) / _inertia(held, theirs),
                         t_ours / t_theirs, t_ours, t_theirs))
        train_r, held_r = statistics.mean(r[0] for r in rows), statistics.mean(r[1] for r in rows)
        time_r = statistics.median(r[2] for r in rows)
        print(f"K={k}: inertia ours/sklearn train {train_r:.3f}, held-out {held_r:.3f}; "
              f"fit time ours/sklearn {time_r:.2f} (median; ours {statistics.median(r[3] for r in rows):.2f} s, "
              f"sklearn {statistics.median(r[4] for r in rows):.2f} s)")
        for seed, r in enumerate(rows):
            print(f"    seed {seed}: inertia ratio train {r[0]:.3f} held-out {r[1]:.3f}, time ratio {r[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
