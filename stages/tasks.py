"""Stage-3 evaluation tasks: what the reference answer of a real utterance is, and how it is scored.

Shared by stage 3's spoken validation (:mod:`stages.stage3`) and ``speechless-infer``
(:mod:`stages.infer`), so that both score an answer the same way. The library names no demo task: a
closed set (the demo's digits) is ``exact:json:<field>``, whose answers the data carries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from datamodules.instructions import CLOSED_TASKS, OPEN_TASKS
from stages.metrics import normalize_transcript

__all__ = ["check_eval_task", "eval_reference", "exact_match", "normalizer", "score"]


def exact_match(answer: str, reference: str) -> bool:
    """First word of the answer, lower-cased and stripped of punctuation, equals the reference."""
    words = answer.strip().lower().split()
    return bool(words) and words[0].strip(".,!?;:'\"") == reference.strip().lower()


def check_eval_task(task: str) -> bool:
    """Check a spoken-validation task name; return whether it is open (scored by WER/CER).

    ``repeat`` (open: the transcript) derives the reference from the sample's ``json.text``
    (:data:`datamodules.instructions.CLOSED_TASKS`); ``json:<key>`` takes the sample's own ``json[<key>]``
    (``json:reference``, ``json:response``) and is open; ``exact:json:<key>`` takes the same field and
    is closed, scored by exact match of the answer's first word (a closed set of one-word answers the
    data carries, such as the demo's digits, ``demo.tasks``).

    Raises:
        ValueError: Any other name.
    """
    field = task.removeprefix("exact:")
    if field.startswith("json:") and field[len("json:") :].strip():
        return not task.startswith("exact:")
    if task not in CLOSED_TASKS:
        raise ValueError(f"eval_task must be one of {sorted(CLOSED_TASKS)}, json:<field> (e.g. json:reference) "
                         f"or exact:json:<field>, got {task!r}")  # fmt: skip
    return task in OPEN_TASKS


def eval_reference(task: str, meta: dict[str, Any], *, where: str = "sample") -> str:
    """The reference answer of one real utterance (its shard json ``meta``) for ``task`` (:func:`check_eval_task`).

    Raises:
        ValueError: The sample lacks what the task needs (an empty transcript, a missing field).
    """
    if task.removeprefix("exact:").startswith("json:"):
        key = task.removeprefix("exact:")[len("json:") :]
        value = meta.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: eval_task {task!r} needs a non-empty json[{key!r}] (it has {sorted(meta)})")
        return value
    try:
        return CLOSED_TASKS[task](meta.get("text") or "")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def normalizer(language: str | None = "en"):
    """Whisper's text normaliser for ``language``, as a function of the text: the one of
    :func:`stages.metrics.normalize_transcript` (English for ``en``, the basic one otherwise, which keeps
    the letters of other languages such as Twi's ɛ and ɔ), with a text of no language scored as English
    (``speechless-infer``'s default)."""
    return functools.partial(normalize_transcript, language=language, unknown="en")


def score(
    answers: list[str], references: list[str], *, mode: str, language: str | Sequence[str | None] | None = "en"
) -> dict[str, float]:
    """``exact`` -> ``{"accuracy"}``; ``transcription`` -> ``{"wer", "cer"}`` on normalised text.

    Args:
        answers: The model's answers.
        references: One reference per answer.
        mode: ``exact`` or ``transcription``.
        language: The normaliser's language (see :func:`normalizer`): one for all, or one per answer
            (each reference and answer normalised for its own language).
    """
    if mode == "exact":
        return {"accuracy": float(np.mean([exact_match(a, r) for a, r in zip(answers, references, strict=True)]))}
    from torchmetrics.text import CharErrorRate, WordErrorRate

    languages = [language] * len(answers) if language is None or isinstance(language, str) else list(language)
    norms = {lang: normalizer(lang) for lang in set(languages)}
    hyp = [norms[lang](a) for a, lang in zip(answers, languages, strict=True)]
    ref = [norms[lang](r) for r, lang in zip(references, languages, strict=True)]
    return {"wer": float(WordErrorRate()(hyp, ref)), "cer": float(CharErrorRate()(hyp, ref))}
