"""A read-news-style sentence corpus synthesized with espeak-ng, for sentence-level stage-2 experiments.

The demo corpus is single digits; a user's corpus is read sentences (e.g. 463 news sentences of
~17 s). This script makes a corpus of that shape that anyone can rebuild: sentences from a small
seeded grammar of news clauses (a few hundred words, every sentence distinct), spoken by several
espeak-ng voices (``demo.tts.synthesize``, the demo's backends), written as a folder of 16 kHz
wavs and a ``manifest.tsv`` that ``speechless-prepare`` reads (``audio text speaker language split``).
Splits are by sentence (a sentence is in one split only, in every voice), like a read corpus whose
held-out set is new text by the same readers.

    .venv/bin/python benchmarks/sentence_corpus.py --out data/sentences/raw --sentences 400 --voices 2 \\
        --min-words 8 --max-words 40
    .venv/bin/python -m datamodules.prepare --manifest data/sentences/raw/manifest.tsv --out data/sentences/shards
"""

from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["VOICES", "news_sentences", "main"]

# (espeak voice, pitch 0-99, rate in words/min): a subset of the demo's recipes.
VOICES = (("en-us", 50, 165), ("en-gb-x-rp+m1", 35, 160), ("en-us+f3", 55, 170), ("en+m3", 40, 150),
          ("en-gb-scotland", 45, 155), ("en+f2", 60, 160))

_SUBJECTS = ["the minister", "the city council", "a local farmer", "scientists", "the company", "the police",
             "the government", "residents", "the national team", "the school board", "the central bank",
             "doctors at the hospital", "the mayor", "a group of students", "the union", "the airline",
             "engineers", "the court", "teachers", "the museum", "fishermen", "the health agency",
             "the opposition party", "investors", "the railway operator", "volunteers"]
_REPORTS = ["said", "announced", "warned", "confirmed", "reported", "told reporters", "explained",
            "claimed", "agreed", "insisted"]
_TIMES = ["on monday", "on tuesday", "on wednesday", "on thursday", "on friday", "last week",
          "this morning", "yesterday", "in march", "in october", "after a long meeting", "late on sunday"]
_ACTIONS = ["would build a new bridge across the river", "had closed the main road for repairs",
            "plans to open three new schools", "will raise the price of bread", "found water on the hill",
            "has cut the number of trains", "would hire more nurses", "had signed a trade agreement",
            "expects heavy rain in the north", "will test a cheaper vaccine", "lost the final match",
            "saved an old library from the fire", "wants to plant a million trees",
            "has doubled the size of the harbour", "will offer free lessons to adults",
            "rejected the new tax on fuel", "moved the market to the old station",
            "has repaired most of the damaged houses", "would lower interest rates",
            "reopened the clinic near the coast", "is building a solar farm", "paid the workers in full",
            "found a rare bird in the forest", "will delay the elections", "bought two new ferries",
            "closed the factory for a month", "is counting the votes again"]
_REASONS = ["because costs had risen", "after complaints from parents", "despite strong protests",
            "to help small businesses", "before the rainy season", "as demand keeps growing",
            "while prices remain high", "after the storm last year", "to protect the river",
            "following a report by experts", "so that more people can travel", "because the old one was unsafe"]
_LINKS = ["and", "but", "while", "although", "and added that"]


def _clause(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_ACTIONS)]
    if rng.random() < 0.6:
        parts.append(rng.choice(_REASONS))
    return " ".join(parts)


def news_sentences(n: int, *, seed: int = 0, min_words: int = 8, max_words: int = 40) -> list[str]:
    """``n`` distinct sentences of ``min_words``..``max_words`` words (a report of one to four clauses)."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(200 * n):
        if len(out) == n:
            break
        words = f"{rng.choice(_SUBJECTS)} {rng.choice(_REPORTS)} {rng.choice(_TIMES)} that {_clause(rng)}"
        while len(words.split()) < min_words or (rng.random() < 0.5 and len(words.split()) < max_words - 8):
            words += f" {rng.choice(_LINKS)} {_clause(rng)}"
        if len(words.split()) > max_words or words in seen:
            continue
        seen.add(words)
        out.append(words[0].upper() + words[1:] + ".")
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct sentences of {min_words}-{max_words} words")
    return out


def _render(job: tuple[str, str, int, int, str]) -> tuple[str, float]:
    import soundfile as sf

    from demo.tts import synthesize

    text, voice, pitch, rate, path = job
    audio = synthesize(text, voice=voice, rate_wpm=rate, pitch=pitch)
    sf.write(path, np.clip(audio, -1, 1), 16000, subtype="PCM_16")
    return path, len(audio) / 16000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the wavs and manifest.tsv")
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--voices", type=int, default=2, help=f"first N of {len(VOICES)} espeak voices")
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=40)
    parser.add_argument("--val", type=float, default=0.05, help="fraction of sentences held out for val")
    parser.add_argument("--test", type=float, default=0.05, help="and for test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = news_sentences(args.sentences, seed=args.seed, min_words=args.min_words, max_words=args.max_words)
    n_val, n_test = round(args.val * len(texts)), round(args.test * len(texts))
    split = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(texts) - n_val - n_test)
    jobs, rows = [], []
    for i, text in enumerate(texts):
        for v, (voice, pitch, rate) in enumerate(VOICES[: args.voices]):
            name = f"s{i:04d}_v{v}.wav"
            jobs.append((text, voice, pitch, rate, str(out / name)))
            rows.append(f"{name}\t{text}\tvoice{v}\ten\t{split[i]}")
    with ProcessPoolExecutor(args.workers) as pool:
        seconds = [s for _, s in pool.map(_render, jobs, chunksize=8)]
    (out / "manifest.tsv").write_text("audio\ttext\tspeaker\tlanguage\tsplit\n" + "\n".join(rows) + "\n")
    print(f"{len(jobs)} utterances, {sum(seconds) / 3600:.2f} h, mean {np.mean(seconds):.1f} s "
          f"(min {min(seconds):.1f}, max {max(seconds):.1f}); {n_val} val / {n_test} test sentences -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
