"""Metrics the stages log: codebook usage (stage 1) and how close generated speech is to real speech (stage 2).

Utilisation and perplexity follow the Twi stage-1 release's reporting: utilisation is the fraction
of codes used at least once over the validation epoch, perplexity is ``exp(entropy)`` of the code
distribution per level (2048 at most for a 2048-code book).

Stage 2's generated codes are compared with the real ones in the stage-1 RVQ's state space:
:func:`aligned_cosine` (a linear stretch), :func:`dtw_cosine` (dynamic time warping) and
:func:`word_match` (is a text's generation closest to its own real utterances?), over the items
:class:`WordMatchItems` keeps; transcripts are scored after Whisper's normaliser
(:func:`normalize_transcript`), as Whisper and DiffusionGemma ASR report WER, and
:func:`chance_wer` is the WER a random transcript of the corpus scores.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from models import distributed as dist_utils

__all__ = [
    "CodebookUsage",
    "WordMatchItems",
    "aligned_cosine",
    "chance_wer",
    "dtw_cosine",
    "normalize_transcript",
    "word_match",
]


class CodebookUsage(Metric):
    """Counts code hits per level over an epoch; ``compute()`` gives utilisation and perplexity.

    Args:
        num_quantizers: Q, the number of RVQ levels.
        codebook_size: K, codes per level.
    """

    full_state_update = False

    def __init__(self, *, num_quantizers: int, codebook_size: int) -> None:
        super().__init__()
        self.num_quantizers, self.codebook_size = num_quantizers, codebook_size
        self.add_state("counts", default=torch.zeros(num_quantizers, codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of codes.

        Args:
            codes: ``[B, Q, T]`` code ids.
            mask: ``[B, T]`` bool, True for real frames; padding frames are not counted.
        """
        q = codes.shape[1]
        flat = codes.transpose(0, 1).reshape(q, -1)  # [Q, B*T]
        if mask is not None:
            flat = flat[:, mask.reshape(-1)]
        offsets = torch.arange(q, device=flat.device)[:, None] * self.codebook_size
        hits = torch.bincount((flat + offsets).reshape(-1), minlength=self.num_quantizers * self.codebook_size)
        self.counts[:q] += hits.view(self.num_quantizers, self.codebook_size)[:q].to(self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        """Returns ``utilisation [Q]``, ``perplexity [Q]``, ``utilisation_overall`` and ``perplexity_mean``."""
        counts = self.counts.float()
        used = (counts > 0).float().mean(dim=1)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)
        perplexity = entropy.exp()
        return {
            "utilisation": used,
            "perplexity": perplexity,
            "utilisation_overall": used.mean(),
            "perplexity_mean": perplexity.mean(),
        }


@functools.lru_cache(maxsize=2)
def _normalizer(english: bool):
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer() if english else BasicTextNormalizer()


def normalize_transcript(text: str, language: str | None, *, unknown: str = "basic") -> str:
    """Whisper's text normaliser for ``language``, the one every WER and CER of the project is scored after.

    The English one (spellings, numbers, contractions) for English (``en``, ``en-US``, ``en_GB``,
    ``eng``), the basic one (case, punctuation, symbols) otherwise, which keeps the letters of other
    languages (Twi's ɛ and ɔ) intact. Both end by collapsing runs of white space into one space; the
    result is stripped, so words are separated by exactly one space.

    Args:
        text: a transcript or an answer.
        language: its language code; ``None`` (or empty) means ``unknown``.
        unknown: the normaliser of a text without a language: ``"basic"`` (stage 2 and the corpus
            figures, which know each utterance's language) or ``"en"`` (stage 3's scoring and
            ``speechless-infer``, whose default language is English).
    """
    if unknown not in ("basic", "en"):
        raise ValueError(f"unknown must be 'basic' or 'en', got {unknown!r}")
    lang = str(language or ("en" if unknown == "en" else "")).lower().replace("_", "-").split("-")[0]
    return " ".join(_normalizer(lang in ("en", "eng", "english"))(text).split())


def chance_wer(texts: list[str], language: str = "en") -> float:
    """The WER of a transcript drawn at random from ``texts`` against each of them: what a model that
    knows the corpus's sentences but not which one was said scores (0.9 for ten one-word digits)."""
    from torchmetrics.text import WordErrorRate

    norm = [normalize_transcript(t, language) for t in texts]
    return float(WordErrorRate()([h for h in norm for _ in norm], [r for _ in norm for r in norm]))


def aligned_cosine(gen: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean per-frame cosine after linearly interpolating ``gen [T_g, D]`` to ``real [T_r, D]``'s length.

    An empty generation scores 0 (no speech is as far from the target as orthogonal speech).
    """
    if gen.shape[0] == 0 or real.shape[0] == 0:
        return real.new_zeros(())
    if gen.shape[0] != real.shape[0]:
        gen = F.interpolate(gen.T[None].float(), size=real.shape[0], mode="linear", align_corners=True)[0].T
    return F.cosine_similarity(gen.float(), real.float(), dim=-1).mean()


def dtw_cosine(gens: list[torch.Tensor], reals: list[torch.Tensor], *, max_cells: int = 1 << 25) -> torch.Tensor:
    """Mean cosine along the best monotonic alignment (dynamic time warping) of each pair.

    ``gens[i] [T_i, D]`` is aligned with ``reals[i] [U_i, D]`` by DTW over the cost ``1 - cosine``
    (steps: both, gen only, real only); the score is the mean cosine over the path's cells. Unlike a
    linear stretch, DTW lets a syllable be early or late without blurring it. A pair with an empty
    side scores 0.

    Pairs are sorted by size and run in chunks of at most ``max_cells`` cost-matrix cells; within a
    chunk the recursion runs over anti-diagonals (``T + U`` vectorised steps, not ``T x U``).

    Returns:
        ``[N]`` float scores in ``[-1, 1]``.
    """
    n = len(gens)
    if n != len(reals):
        raise ValueError(f"{n} generations but {len(reals)} real utterances")
    out = torch.zeros(n)
    live = [i for i in range(n) if gens[i].shape[0] > 0 and reals[i].shape[0] > 0]
    live.sort(key=lambda i: (gens[i].shape[0], reals[i].shape[0]))
    start = 0
    while start < len(live):
        stop = start + 1  # grow the chunk while its padded cost matrices fit the budget
        t, u = gens[live[start]].shape[0], reals[live[start]].shape[0]
        while stop < len(live):
            t2, u2 = max(t, gens[live[stop]].shape[0]), max(u, reals[live[stop]].shape[0])
            if (stop + 1 - start) * t2 * u2 > max_cells:
                break
            t, u, stop = t2, u2, stop + 1
        idx = live[start:stop]
        out[idx] = _dtw_chunk([gens[i] for i in idx], [reals[i] for i in idx])
        start = stop
    return out


def _dtw_chunk(gens: list[torch.Tensor], reals: list[torch.Tensor]) -> torch.Tensor:
    """:func:`dtw_cosine` of non-empty pairs, padded to one ``[N, T, U]`` cost tensor."""
    n = len(gens)
    tg = torch.tensor([g.shape[0] for g in gens])
    tr = torch.tensor([r.shape[0] for r in reals])
    g = torch.nn.utils.rnn.pad_sequence([F.normalize(x.float(), dim=-1) for x in gens], batch_first=True)
    r = torch.nn.utils.rnn.pad_sequence([F.normalize(x.float(), dim=-1) for x in reals], batch_first=True)
    cost = 1 - g @ r.transpose(1, 2)  # [N, T, U]
    t_max, u_max = cost.shape[1:]
    big = torch.finfo(cost.dtype).max / 4
    # Anti-diagonal d holds cells (i, d - i), i = 0..T (1-based DP indices; row/column 0 is the border).
    i = torch.arange(t_max + 1)
    prev2_cost = torch.full((n, t_max + 1), big)  # diagonal d - 2: accumulated cost
    prev2_len = torch.zeros(n, t_max + 1)  # and the length of that best path
    prev2_cost[:, 0] = 0.0  # d = 0: only the origin (0, 0)
    prev1_cost, prev1_len = torch.full((n, t_max + 1), big), torch.zeros(n, t_max + 1)  # d = 1: border only
    total, steps = torch.zeros(n), torch.ones(n)
    rows = torch.arange(n)

    def shifted(x: torch.Tensor, fill: float) -> torch.Tensor:  # x[:, i - 1], with ``fill`` at i = 0
        return torch.cat([x.new_full((n, 1), fill), x[:, :-1]], 1)

    for d in range(2, t_max + u_max + 1):
        j = d - i
        ok = (i >= 1) & (j >= 1) & (j <= u_max)
        c = cost[:, (i - 1).clamp(0, t_max - 1), (j - 1).clamp(0, u_max - 1)]  # [N, T + 1]
        cand = torch.stack([shifted(prev2_cost, big), shifted(prev1_cost, big), prev1_cost], 2)
        lens = torch.stack([shifted(prev2_len, 0.0), shifted(prev1_len, 0.0), prev1_len], 2)
        best, arg = cand.min(2)
        new_cost = torch.where(ok, best + c, big)
        new_len = torch.where(ok, lens.gather(2, arg[..., None])[..., 0] + 1, 0.0)
        end = (tg + tr) == d  # pairs whose last cell (T_n, U_n) lies on this diagonal
        total = torch.where(end, new_cost[rows, tg], total)
        steps = torch.where(end, new_len[rows, tg], steps)
        prev2_cost, prev2_len, prev1_cost, prev1_len = prev1_cost, prev1_len, new_cost, new_len
    return 1 - total / steps.clamp(min=1)


def word_match(
    items: list[tuple[str, torch.Tensor, torch.Tensor]], *, align: Literal["dtw", "linear"] = "dtw"
) -> tuple[float, int]:
    """Fraction of texts whose generated states are closest to their own real states.

    Args:
        items: ``(text, generated states [T_g, D], real states [T_r, D])`` per utterance.
        align: ``"dtw"`` (default, :func:`dtw_cosine`) or ``"linear"`` (:func:`aligned_cosine`)
            length alignment of a generated and a real utterance.

    Returns:
        ``(fraction of texts matched, number of texts)``; a text matches when the mean cosine of
        its generations to the real utterances of the same text is higher than to the real
        utterances of every other text. Cosines are taken around the mean real state of ``items``.
        Identical generations of a text (greedy decoding) are scored once. Chance is
        ``1 / number of texts``.
    """
    if not items:
        return float("nan"), 0
    # Encoder states share a large common component (every raw cosine is ~0.95), so states are
    # compared around the mean real state of the evaluated set: cosine of the deviations.
    center = torch.cat([r for _, _, r in items]).mean(0)
    gens: dict[str, list[torch.Tensor]] = {}
    reals: dict[str, list[torch.Tensor]] = {}
    for text, g, r in items:
        same = gens.setdefault(text, [])
        if not any(x.shape == g.shape and torch.equal(x, g) for x in same):
            same.append(g)
        reals.setdefault(text, []).append(r - center)
    gens = {t: [g - center for g in v] for t, v in gens.items()}
    words = sorted(gens)
    if len(words) < 2:
        return float("nan"), len(words)
    pairs = [(wi, vi, g, r) for wi, w in enumerate(words) for g in gens[w] for vi, v in enumerate(words) for r in reals[v]]
    if align == "dtw":
        scores = dtw_cosine([p[2] for p in pairs], [p[3] for p in pairs])
    else:
        scores = torch.stack([aligned_cosine(p[2], p[3]) for p in pairs])
    idx = torch.tensor([[p[0], p[1]] for p in pairs])
    sums, counts = torch.zeros(len(words), len(words)), torch.zeros(len(words), len(words))
    sums.index_put_((idx[:, 0], idx[:, 1]), scores.float(), accumulate=True)
    counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(pairs)), accumulate=True)
    score = sums / counts.clamp(min=1)
    own = score.diagonal()
    others = score.masked_fill(torch.eye(len(words), dtype=torch.bool), float("-inf")).amax(1)
    return float((own > others).float().mean()), len(words)


class WordMatchItems:
    """The (generated, real) states of at most ``max_texts`` texts, kept for :func:`word_match`.

    Word match costs ``texts x utterances`` DTW alignments, so a real validation set (thousands of
    distinct sentences) is scored over a fixed subset: the ``max_texts`` smallest texts (string
    order) of the whole set. Each rank keeps only its own ``max_texts`` smallest texts while the
    epoch runs (memory stays bounded), and :meth:`gather` exchanges first the text lists, then only
    the items of the globally chosen texts, so every rank scores the same items and logs the same
    figure, the one a single process would log.
    """

    def __init__(self, max_texts: int) -> None:
        if max_texts < 2:
            raise ValueError(f"word match needs max_texts >= 2, got {max_texts}")
        self.max_texts = max_texts
        self.by_text: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, text: str, generated: torch.Tensor, real: torch.Tensor) -> None:
        self.by_text.setdefault(text, []).append((generated, real))
        if len(self.by_text) > self.max_texts:
            del self.by_text[max(self.by_text)]

    def gather(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """All ranks' items of the ``max_texts`` smallest texts overall (a collective under DDP)."""
        chosen, local = sorted(self.by_text), self.by_text
        if dist_utils.is_dist():
            world = dist_utils.world_size()
            names: list[list[str]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(names, chosen)
            chosen = sorted({t for part in names for t in part})[: self.max_texts]
            parts: list[dict] = [{} for _ in range(world)]
            torch.distributed.all_gather_object(parts, {t: local[t] for t in chosen if t in local})
            local = {t: [item for part in parts for item in part.get(t, [])] for t in chosen}
        return [(t, g, r) for t in chosen for g, r in local.get(t, [])]

    def clear(self) -> None:
        self.by_text = {}
