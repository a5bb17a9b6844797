"""Benchmark: this repository's ResidualVQ against vector-quantize-pytorch and the compute floor.

Usage::

    python benchmarks/bench_rvq.py                       # 2,000 frames, 8 x 2048 x 1024, CPU fp32
    python benchmarks/bench_rvq.py --device cuda --dtype bf16 --frames 32000

Times (median of ``--repeats`` runs after ``--warmup`` runs) of

- a training step (forward + backward + EMA update + dead-code check) of ``models.rvq.ResidualVQ``
  and of ``vector_quantize_pytorch.ResidualVQ`` with comparable settings (EMA, decay 0.99,
  commitment 0.25, dead-code restart, no k-means: initialisation is a one-off);
- an encode (codes only, no update) of both;
- the floor: per level one ``[N, D] x [D, K]`` matmul + argmin + gather, nothing else.

The stage-1 targets: train step >= 3x faster than vector-quantize-pytorch, encode <= 1.25x floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.rvq import ResidualVQ  # noqa: E402

FLOOR = "floor (matmul+argmin+gather)"


def _time_all(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall seconds of each function after ``warmup`` rounds (CUDA synchronised).

    Runs round-robin (one call of each per round) so that load from other processes on a shared
    machine hits every contender alike instead of whichever happened to run at the time.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--codes", type=int, default=2048)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--skip-vqp", action="store_true", help="do not time vector-quantize-pytorch")
    parser.add_argument("--json", default=None, help="also write the timings (seconds) to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, d, q, k = args.frames, args.dim, args.levels, args.codes
    x = torch.randn(1, n, d, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    ours = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k, kmeans_init=False, decay=0.99).to(device)
    ours.train()

    def ours_train() -> None:
        xg = x.clone().requires_grad_(True)
        with autocast:
            out = ours(xg)
            loss = out.quantized.float().sum() + out.loss
        loss.backward()

    def ours_encode() -> None:
        with autocast:
            ours.encode(x)

    codebooks = ours.codebook_embeddings().clone()

    @torch.no_grad()
    def floor() -> None:
        # fp32 even with --dtype bf16: fp32 distances are required for correct codes.
        for level in range(q):
            idx = torch.mm(x[0], codebooks[level].t()).argmin(dim=-1)
            codebooks[level].index_select(0, idx)

    fns = {"ours train step": ours_train, "ours encode": ours_encode, FLOOR: floor}

    if not args.skip_vqp:
        from vector_quantize_pytorch import ResidualVQ as VqpResidualVQ

        vqp = VqpResidualVQ(
            dim=d,
            num_quantizers=q,
            codebook_size=k,
            decay=0.99,
            kmeans_init=False,
            commitment_weight=0.25,
            threshold_ema_dead_code=0.01 * n / k,
        ).to(device)

        def vqp_train() -> None:
            vqp.train()
            xg = x.clone().requires_grad_(True)
            with autocast:
                quantized, _, losses = vqp(xg)
                loss = quantized.float().sum() + losses.sum()
            loss.backward()

        @torch.no_grad()
        def vqp_encode() -> None:
            vqp.eval()
            with autocast:
                vqp(x)

        fns.update({"vqp train step": vqp_train, "vqp encode": vqp_encode})

    results = _time_all(fns, device, args.warmup, args.repeats)

    print(
        f"RVQ benchmark: {n} frames, Q={q} x K={k} x D={d}, {device.type} {args.dtype}, "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeats}"
    )
    print(f"{'what':32s} {'ms':>10s}" + (f" {'frames/s':>12s}" if device.type == "cuda" else ""))
    for name, seconds in results.items():
        fps = f" {n / seconds:12,.0f}" if device.type == "cuda" else ""
        print(f"{name:32s} {seconds * 1e3:10.1f}{fps}")
    print(f"encode / floor: {results['ours encode'] / results[FLOOR]:.2f}x (target <= 1.25)")
    if "vqp train step" in results:
        print(
            f"train speedup vs vqp: {results['vqp train step'] / results['ours train step']:.2f}x (target >= 3)"
        )
        print(f"encode speedup vs vqp: {results['vqp encode'] / results['ours encode']:.2f}x")
    if args.json:
        report = {"frames": n, "levels": q, "codes": k, "dim": d, "device": device.type, "dtype": args.dtype,
                  "threads": torch.get_num_threads(), "seconds": results,
                  "encode_over_floor": results["ours encode"] / results[FLOOR]}  # fmt: skip
        if "vqp train step" in results:
            report["train_speedup_vs_vqp"] = results["vqp train step"] / results["ours train step"]
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
