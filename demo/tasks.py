"""The demo's closed task: a spoken digit word in, the next digit word out (``"nine"`` -> ``"zero"``).

The library knows no demo task. The demo's data carries each answer in a json field (``answer``: a column
of the corpus manifest, so every speech shard, token shard and instruction file has it), and the demo's
configs and runner name that field: stage 3 ``eval_task: exact:json:answer`` (exact match of the
answer's first word, ``val/spoken_accuracy``), training on real codes ``response_key: answer``, and
``speechless-infer --closed-task exact:json:answer``. Ten answers, so chance is 0.1.
"""

from __future__ import annotations

__all__ = ["ANSWER_FIELD", "CLOSED_TASK", "DIGITS", "next_digit", "previous_digit"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANSWER_FIELD = "answer"  # the json field (manifest column) holding each utterance's answer
CLOSED_TASK = f"exact:json:{ANSWER_FIELD}"  # how the library is told to score it (eval_task, --closed-task)


def _index(text: str) -> int:
    word = text.strip().lower()
    if word not in DIGITS:
        raise ValueError(f"next_digit: {text!r} is not a digit word {DIGITS}")
    return DIGITS.index(word)


def next_digit(text: str) -> str:
    """The English digit word after ``text``, modulo ten (``"Nine"`` -> ``"zero"``).

    Raises:
        ValueError: ``text`` is not one of :data:`DIGITS` (case and surrounding spaces aside).
    """
    return DIGITS[(_index(text) + 1) % len(DIGITS)]


def previous_digit(text: str) -> str:
    """The English digit word before ``text``, modulo ten (``"zero"`` -> ``"nine"``)."""
    return DIGITS[(_index(text) - 1) % len(DIGITS)]
