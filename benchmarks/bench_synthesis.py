"""Stage-2 synthesis throughput: batched KV-cache decoding vs a per-text HF ``generate`` loop.

Both sides run the same randomly initialised small Gemma 3 in the one-level token form (Ichigo
strings, no duration tokens so one token is one frame) and produce exactly ``--frames`` frames per
text: the batched path via ``min_frames == max_frames``, HF via ``min_new_tokens == max_new_tokens``.
Prints frames/s of each and their ratio (target: >= 10x at a batch of 32-64 on the CPU).

    python benchmarks/bench_synthesis.py --batch 32 --frames 48
    python benchmarks/bench_synthesis.py --device cuda --dtype bf16 --batch 64 --frames 250
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from demo.tiny import (
    gemma3_lm_debug_config,  # noqa: E402
    train_tokenizer,  # noqa: E402
)
from models.speech_lm import SpeechLM  # noqa: E402

__all__ = ["main"]

WORDS = "me din de kofi akwaaba wo ho te sen na mefi kumasi accra nnipa pii ba ha nnɛ".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(n)]


def _hf_loop(model: SpeechLM, texts: list[str], frames: int) -> int:
    """One ``generate`` call per text, the way a naive synthesis script would run."""
    produced = 0
    for text in texts:
        ids = torch.tensor([model.prompt_ids(text) + [model.start_id]], device=model.device)
        out = model.lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=frames,
            min_new_tokens=frames,
            do_sample=False,
            eos_token_id=model.end_id,
            pad_token_id=model.pad_id,
        )
        produced += out.shape[1] - ids.shape[1]
    return produced


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="texts per batched call")
    parser.add_argument("--frames", type=int, default=48, help="frames per text (25 frames = 1 s)")
    parser.add_argument("--hidden", type=int, default=256, help="LM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LM layers")
    parser.add_argument("--codebook", type=int, default=2048, help="codes per level (added tokens)")
    parser.add_argument("--hf-texts", type=int, default=8, help="texts timed in the per-text loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype of both sides")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = train_tokenizer(_texts(200, seed=1), vocab_size=400)
    cfg = gemma3_lm_debug_config(
        len(tok),
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    model = SpeechLM(
        lm=cfg, tokenizer=tok, codebook_size=args.codebook, output_form="one_level", use_durations=False
    )
    model = model.to(args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    texts = _texts(args.batch)
    n_params = sum(p.numel() for p in model.parameters())

    model.generate(texts[:2], max_frames=4, min_frames=4)  # warm-up
    _hf_loop(model, texts[:1], 4)

    t0 = time.perf_counter()
    codes = model.generate(texts, max_frames=args.frames, min_frames=args.frames)
    batched_s = time.perf_counter() - t0
    assert all(c.shape == (1, args.frames) for c in codes), "batched path did not produce fixed lengths"
    batched_fps = args.batch * args.frames / batched_s

    hf_texts = texts[: args.hf_texts]  # the per-text loop's rate does not depend on how many
    t0 = time.perf_counter()
    produced = _hf_loop(model, hf_texts, args.frames)
    hf_s = time.perf_counter() - t0
    assert produced == len(hf_texts) * args.frames, "HF loop did not produce fixed lengths"
    hf_fps = produced / hf_s

    result = dict(batched_fps=batched_fps, hf_fps=hf_fps, ratio=batched_fps / hf_fps)
    print(
        f"model: Gemma3 {args.layers}x{args.hidden}, {n_params / 1e6:.1f}M params, vocab {len(tok)}, "
        f"device {args.device} {args.dtype}, threads {torch.get_num_threads()}"
    )
    print(
        f"batched  : {args.batch} texts x {args.frames} frames in {batched_s:.2f} s = {batched_fps:,.0f} frames/s"
    )
    print(f"HF loop  : {len(hf_texts)} texts x {args.frames} frames in {hf_s:.2f} s = {hf_fps:,.0f} frames/s")
    print(f"speed-up : {result['ratio']:.1f}x")
    if args.json:
        report = {**result, "batch": args.batch, "frames": args.frames, "hidden": args.hidden, "layers": args.layers,
                  "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return result


if __name__ == "__main__":
    main()
