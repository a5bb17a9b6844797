"""Stage 3's streamed data at 10^4 .. 10^6 instructions: peak RSS, batches/s and the real-token share.

Builds synthetic instruction token shards (random codes ``[8, T]``, T uniform in [125, 375], mean 250;
stored as int16: ~6 KB a row on disk, so 10^4 ~ 60 MB, 10^5 ~ 0.6 GB) with
``datamodules.shards.ShardWriter`` (10^6 and other multiples of 10^5: the 10^5 set's shards ten times
over, as hard links, so no more disk) and a text JSONL of a quarter as many pairs, then iterates the
stage-3 train loader (``InstructionDataModule``, streamed, ``text_ratio`` 0.25, a token budget per
batch and length buckets) with a trivial builder (one token per code frame, per response word and 20
of template: no tokenizer, so the figures are the data path's own). Each size runs in a fresh process,
so its peak RSS is its own; every size reads the same number of batches, so batches/s compare.
Prints per size: the seconds the epoch's plan takes and the RSS of the indexes and the plan (which rank and
batch each row goes to), the RSS growth while reading, peak RSS, batches/s after the shuffle buffer's
first fill, and the real-token share of the same batches padded (one example a row) and packed
(``models.chat_format.collate_instructions``, rows of ``--row-tokens``).

    python benchmarks/bench_stage3_data.py --sizes 10000 100000 --out /some/scratch
    python benchmarks/bench_stage3_data.py --sizes 10000 100000 1000000 --out /some/scratch

Threads: the loader runs in the main process (``num_workers`` 0) and torch uses one thread
(``torch.set_num_threads(1)``); ratios between sizes are what to read, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

LEVELS, CODEBOOK = 8, 2048
BASE = 100_000  # rows written for real; larger sets repeat its shards (hard links)


def write_set(root: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """``size`` instruction rows as token shards of 5000 rows, and ``size // 4`` text pairs; reused if present.

    A set over ``BASE`` rows (a multiple of it) repeats the ``BASE`` set's shards under new names, as
    hard links (no extra disk): a real set of that many rows, whose codes recur every ``BASE``.
    """
    from dataclasses import replace

    from datamodules.shards import read_index, write_index

    shards, text = root / f"tokens_{size}", root / f"text_{size}.jsonl"
    if (shards / "index.json").exists() and text.exists():
        return shards, text
    rng = np.random.default_rng(seed)
    if size > BASE and size % BASE == 0:
        base, _ = write_set(root, BASE, seed)
        index = read_index(base)
        shards.mkdir(parents=True, exist_ok=True)
        infos = []
        for copy in range(size // BASE):
            for info in index.shards:
                name = f"copy{copy}-{info.url}"
                if not (shards / name).exists():
                    os.link(base / info.url, shards / name)
                infos.append(replace(info, url=name))
        write_index(replace(index, shards=infos, root=str(shards)), shards)
    else:
        _write_rows(shards, size, rng)
    with open(text, "w") as f:
        for i in range(size // 4):
            words = " ".join("w" for _ in range(int(rng.integers(3, 60))))
            f.write(json.dumps({"instruction": f"text {i} " + words, "response": words}) + "\n")
    return shards, text


def _write_rows(shards: Path, size: int, rng: np.random.Generator) -> None:
    from datamodules.shards import ShardWriter

    with ShardWriter(shards, prefix="train", max_samples=5000, max_bytes=1 << 40, kind="tokens") as writer:
        for i in range(size):
            frames = int(rng.integers(125, 376))
            codes = rng.integers(0, CODEBOOK, size=(LEVELS, frames), dtype=np.int16)
            words = " ".join("w" for _ in range(int(rng.integers(3, 30))))
            meta = {"instruction": f"instruction {i}", "response": words, "n_frames": frames}
            writer.write({"__key__": f"i{i:07d}", "json": meta, "codes.npy": codes}, seconds=frames / 25)


def build(*, instruction_text, codes, response):
    """One token per code frame (or instruction word), per response word, and 20 of template."""
    n = (codes.shape[-1] if codes is not None else len(instruction_text.split())) + len(response.split()) + 20
    ids = torch.ones(n, dtype=torch.long)
    out = {"input_ids": ids, "labels": ids.clone(), "audio_positions": torch.zeros(n, dtype=torch.bool)}
    return {**out, "codes": codes} if codes is not None else out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(args: argparse.Namespace) -> dict:
    """Iterate ``--batches`` batches of the set of ``--one`` rows in this process."""
    from datamodules.instructions import InstructionDataModule
    from models.chat_format import collate_instructions

    torch.set_num_threads(1)
    shards, text = write_set(Path(args.out), args.one)
    start_rss = rss_mb()
    real = {"padded": [0, 0], "packed": [0, 0]}

    def collate(examples):
        for name, pack in (("padded", False), ("packed", True)):
            batch = collate_instructions(examples, pad_id=0, pack=pack, max_tokens_per_row=args.row_tokens)
            real[name][0] += int(batch["real_tokens"])
            real[name][1] += batch["input_ids"].numel()
        return len(examples)

    dm = InstructionDataModule(train_shards=str(shards), text_jsonl=str(text), text_ratio=0.25, batch_size=256,
                               max_batch_tokens=args.batch_tokens, bucket_boundaries=[150, 200, 250, 300, 350],
                               shuffle_buffer=1000, prompt_tokens=30)  # fmt: skip
    dm.bind(build_example=build, collate=collate)
    dm.setup("fit")
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    epoch_batches = len(loader)  # the epoch's plan, from the indexes
    plan_seconds = time.perf_counter() - t0
    ready_rss = rss_mb()
    n, examples, first = 0, 0, None
    for examples_in_batch in loader:
        n += 1
        examples += examples_in_batch
        first = first or time.perf_counter()  # after the shuffle buffer's first fill
        if n == args.batches:
            break
    seconds = time.perf_counter() - first
    return {
        "size": args.one, "epoch_batches": epoch_batches, "batches": n, "examples": examples, "plan_s": plan_seconds,
        "batches_per_s": (n - 1) / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_loader_mb": start_rss, "loader_rss_mb": ready_rss - start_rss,
        "iter_rss_growth_mb": rss_mb() - ready_rss,
        "real_padded": real["padded"][0] / max(1, real["padded"][1]),
        "real_packed": real["packed"][0] / max(1, real["packed"][1]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", required=True, help="scratch folder for the shard sets (kept and reused)")
    parser.add_argument("--batches", type=int, default=400, help="batches read per size")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded-token budget of a batch")
    parser.add_argument("--row-tokens", type=int, default=2048, help="row capacity when packing")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"stage-3 train loader, {args.batches} batches per size, budget {args.batch_tokens} tokens, "
          f"rows of {args.row_tokens} when packed; 1 torch thread, num_workers 0", flush=True)  # fmt: skip
    header = (f"{'instructions':>12} {'epoch batches':>13} {'plan s':>6} {'peak RSS MB':>11} {'plan MB':>7} "
              f"{'iter +MB':>8} {'batches/s':>9} {'real padded':>11} {'real packed':>11}")  # fmt: skip
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), "--out", args.out, "--batches", str(args.batches),
               "--batch-tokens", str(args.batch_tokens), "--row-tokens", str(args.row_tokens)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(header)
    for r in rows:
        print(f"{r['size']:>12} {r['epoch_batches']:>13} {r['plan_s']:>6.1f} {r['peak_rss_mb']:>11.0f} {r['loader_rss_mb']:>7.1f} "
              f"{r['iter_rss_growth_mb']:>8.1f} {r['batches_per_s']:>9.1f} {r['real_padded']:>11.3f} {r['real_packed']:>11.3f}")  # fmt: skip
    base = rows[0]
    for r in rows[1:]:
        print(f"x{r['size'] / base['size']:.0f} rows: peak RSS x{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}, "
              f"batches/s x{r['batches_per_s'] / base['batches_per_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
