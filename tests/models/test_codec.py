"""Round trips and format checks for the Ichigo-style semantic-token codecs."""

import re

import numpy as np
import pytest
import torch

from models.codec import (
    codes_to_string,
    levels_to_string,
    run_lengths,
    sound_token_names,
    string_to_codes,
    string_to_levels,
)

RUN_CASES = {
    "empty": [],
    "singletons": [3, 1, 4, 1, 5, 9, 2, 6],
    "run2": [7, 7],
    "run49": [5] * 49,
    "run50": [5] * 50,
    "run200": [8] * 200,
    "mixed": [1] + [2] * 2 + [3] * 49 + [4] * 50 + [5] + [6] * 200 + [2047],
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", list(RUN_CASES))
def test_one_level_round_trip(name, compress):
    codes = RUN_CASES[name]
    s = codes_to_string(codes, compress=compress)
    assert s.startswith("<|sound_start|>") and s.endswith("<|sound_end|>")
    np.testing.assert_array_equal(string_to_codes(s), np.asarray(codes, dtype=np.int64))
    durations = [int(d) for d in re.findall(r"<\|duration_(\d+)\|>", s)]
    assert all(2 <= d <= 49 for d in durations)  # never an out-of-vocabulary duration
    if not compress:
        assert not durations and s.count("<|sound_") - 2 == len(codes)


def test_ichigo_format_exact():
    # Ichigo's convert_ids_to_tokens puts the duration before the code it repeats.
    assert codes_to_string([12, 12, 12, 40], compress=True) == (
        "<|sound_start|><|duration_03|><|sound_0012|><|sound_0040|><|sound_end|>"
    )
    assert (
        codes_to_string(torch.tensor([0, 2047])) == "<|sound_start|><|sound_0000|><|sound_2047|><|sound_end|>"
    )
    assert codes_to_string([], compress=True) == "<|sound_start|><|sound_end|>"


def test_long_runs_are_split_and_min_duration_respected():
    s = codes_to_string([5] * 50, compress=True)
    assert s == "<|sound_start|><|duration_49|><|sound_0005|><|sound_0005|><|sound_end|>"
    s = codes_to_string([5] * 12, compress=True, max_duration=5)
    assert s.count("<|duration_05|>") == 2 and s.count("<|duration_02|>") == 1
    assert string_to_codes(s).tolist() == [5] * 12
    s = codes_to_string([1, 1, 2, 2, 2], compress=True, min_duration=3)
    assert s == "<|sound_start|><|sound_0001|><|sound_0001|><|duration_03|><|sound_0002|><|sound_end|>"
    assert run_lengths([4] * 7, max_duration=3) == [(4, 3), (4, 3), (4, 1)]


@pytest.mark.parametrize(
    "bad",
    [
        "<|sound_0001|><|sound_end|>",  # no start
        "<|sound_start|><|sound_0001|>",  # no end
        "<|sound_start|><|duration_03|><|sound_end|>",  # dangling duration
        "<|sound_start|><|duration_03|><|duration_02|><|sound_0001|><|sound_end|>",
        "<|sound_start|><|sound_abcd|><|sound_end|>",
        "<|sound_start|>hello<|sound_0001|><|sound_end|>",
        "<|sound_start|><|sound_end|><|sound_start|><|sound_end|>",
    ],
)
def test_malformed_strings_raise(bad):
    with pytest.raises(ValueError):
        string_to_codes(bad)


def test_bad_codes_raise():
    with pytest.raises(ValueError):
        codes_to_string([[1, 2]])
    with pytest.raises(ValueError):
        codes_to_string([-1])
    with pytest.raises(ValueError):
        codes_to_string([1.5])
    with pytest.raises(ValueError):
        codes_to_string([1], compress=True, max_duration=1)


@pytest.mark.parametrize("compress", [False, True])
def test_multi_level_round_trip(compress):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(8, 60))
    codes[0, 10:70] = 3  # a long run in level 0
    s = levels_to_string(codes, compress=compress)
    np.testing.assert_array_equal(string_to_levels(s), codes)
    # Level 0 is the plain Ichigo string, so Ichigo tooling reading the first block still works.
    first = s[: s.index("<|sound_end|>") + len("<|sound_end|>")]
    assert first == codes_to_string(codes[0], compress=compress)
    np.testing.assert_array_equal(string_to_codes(first), codes[0])
    assert "<|sound_start_l7|>" in s and "<|sound_l7_" in s and "<|sound_l8_" not in s


def test_multi_level_rejects_inconsistent_levels():
    s = levels_to_string(np.zeros((2, 5), dtype=int))
    with pytest.raises(ValueError, match="different lengths"):
        string_to_levels(s.replace("<|sound_l1_0000|>", "", 1))
    with pytest.raises(ValueError):  # levels out of order
        string_to_levels(s[s.index("<|sound_start_l1|>") :] + s[: s.index("<|sound_start_l1|>")])
    np.testing.assert_array_equal(
        string_to_levels(levels_to_string(np.zeros((3, 0), dtype=int))), np.zeros((3, 0))
    )


def test_sound_token_names_cover_every_emitted_token():
    names = sound_token_names(2048)
    assert len(names) == len(set(names)) == 2 + 2048 + 48
    assert names[:2] == ["<|sound_start|>", "<|sound_end|>"]
    assert "<|duration_02|>" in names and "<|duration_49|>" in names and "<|duration_50|>" not in names
    assert len(sound_token_names(16, with_durations=False)) == 18
    vocab = set(sound_token_names(64, num_levels=3))
    s = levels_to_string(np.random.default_rng(1).integers(0, 3, size=(3, 300)), compress=True)
    assert set(re.findall(r"<\|[^|]*\|>", s)) <= vocab
