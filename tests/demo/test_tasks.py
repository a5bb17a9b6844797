"""The demo's closed task (demo/tasks.py): the next digit word, and the field that carries it."""

import pytest

from demo.tasks import CLOSED_TASK, DIGITS, next_digit, previous_digit
from stages.tasks import check_eval_task, eval_reference


def test_next_digit_wraps_and_rejects():
    assert next_digit("Nine") == "zero"
    with pytest.raises(ValueError):
        next_digit("eleven")


def test_previous_digit_undoes_next_digit():
    assert all(previous_digit(next_digit(d)) == d for d in DIGITS)


def test_the_library_scores_the_carried_answer_as_a_closed_task():
    assert check_eval_task(CLOSED_TASK) is False  # closed: exact match, val/spoken_accuracy
    assert eval_reference(CLOSED_TASK, {"text": "three", "answer": next_digit("three")}) == "four"
    with pytest.raises(ValueError, match=r"needs a non-empty json\['answer'\]"):
        eval_reference(CLOSED_TASK, {"text": "three"})
