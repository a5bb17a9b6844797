"""How well can *real* speech of one speaker group stand in for a word on a held-out speaker?

The stage-2 word match asks whether generated codes of a word are closer to the held-out speaker's
real utterances of that word than to those of other words. This script measures the same figure
with real training clips in place of generations (one random training clip per word, several
draws), so it bounds what a stage-2 model can reach with a given encoder. It compares the demo's
tiny random-weight Gemma 4 audio encoder with and without its per-utterance normalisations
(``level_db``, ``center_states``; see ``models.encoders.FrozenEncoder``). The word match itself is
``stages.metrics.word_match`` (DTW alignment, states centred on the evaluated set's mean), run on the
encoder states directly (no RVQ), so the figure isolates the encoder.

Needs FSDD shards from the demo (``python -m demo --corpus fsdd --stages 1`` writes
``data/fsdd/shards``) and the demo encoder folder it writes; exits 0 with a message if absent.

    .venv/bin/python benchmarks/bench_word_match_ceiling.py --per-word 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datamodules.audio import decode_flac  # noqa: E402
from datamodules.shards import iter_tar_samples, resolve_shards  # noqa: E402
from models.encoders import Gemma4AudioEncoder  # noqa: E402
from stages.metrics import word_match  # noqa: E402

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _clips(shards: Path) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for path in resolve_shards(str(shards)).paths():
        for raw in iter_tar_samples(path):
            wave, _ = decode_flac(raw["flac"])
            out.setdefault(json.loads(raw["json"])["text"], []).append(torch.from_numpy(wave).float())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default=str(ROOT / "data/fsdd/shards"))
    parser.add_argument("--encoder", default=str(ROOT / "data/fsdd/models/gemma4_audio"))
    parser.add_argument("--per-word", type=int, default=8, help="random training clips tried per word")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shards, encoder_dir = Path(args.shards), Path(args.encoder)
    if not (shards / "train").exists() or not (encoder_dir / "config.json").exists():
        print(f"needs {shards}/train|test and {encoder_dir}: run `python -m demo --corpus fsdd --stages 1` first")
        return 0
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    train, test = _clips(shards / "train"), _clips(shards / "test")
    rng = random.Random(args.seed)
    picks = {w: rng.sample(clips, min(args.per_word, len(clips))) for w, clips in train.items()}
    words = sorted(test)
    print(f"{len(words)} words; {sum(map(len, test.values()))} held-out clips; {args.per_word} training clips per word tried")
    print(f"{'encoder':<34} {'word match (mean over draws)':>28}   chance {1 / len(words):.2f}")
    for label, kw in [("random Gemma 4, raw", {}), ("+ level_db -20", {"level_db": -20.0}),
                      ("+ center_states", {"center_states": True}),
                      ("+ level_db -20 + center_states", {"level_db": -20.0, "center_states": True})]:
        enc = Gemma4AudioEncoder(source=str(encoder_dir), **kw)

        def states(clips: list[torch.Tensor], enc=enc, batch: int = 32) -> list[torch.Tensor]:
            out = []
            for i in range(0, len(clips), batch):
                part = clips[i : i + batch]
                enc_out = enc(torch.nn.utils.rnn.pad_sequence(part, batch_first=True), torch.tensor([len(x) for x in part]))
                out += [enc_out.states[j, : int(n)] for j, n in enumerate(enc_out.lengths)]
            return out

        with torch.no_grad():
            held_out = {w: states(test[w]) for w in words}
            tried = {w: states(picks[w]) for w in words}
            draws = []
            for k in range(args.per_word):
                items = [(w, tried[w][k % len(tried[w])], r) for w in words for r in held_out[w]]
                draws.append(word_match(items)[0])
        print(f"{label:<34} {sum(draws) / len(draws):>28.2f}   draws: {' '.join(f'{d:.1f}' for d in draws)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
