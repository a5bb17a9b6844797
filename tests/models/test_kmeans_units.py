"""models.units: exact deduplication and private-use round trips, also through real text tokenizers."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from models.units import (
    BMP_PUA_SIZE,
    MAX_UNITS,
    check_unit_count,
    collapse,
    expand,
    pua_to_units,
    units_to_pua,
)


def _random_units(seed: int, k: int, n: int = 300) -> list[int]:
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        out.extend([rng.randrange(k)] * rng.randint(1, 6))  # runs, as frame-rate units have
    return out[:n]


@pytest.mark.parametrize("seed", range(5))
def test_collapse_is_exactly_inverted_by_expand(seed):
    units = _random_units(seed, 50)
    values, lengths = collapse(torch.tensor(units))
    assert expand(values, lengths) == units and sum(lengths) == len(units)
    assert all(a != b for a, b in zip(values, values[1:]))  # no two equal neighbours left
    assert collapse([]) == ([], []) and collapse([7, 7, 7]) == ([7], [3])
    with pytest.raises(ValueError, match=">= 1"):
        expand([1], [0])


def test_pua_layout_and_round_trip_over_every_plane():
    assert units_to_pua([0, 6399], dedup=False) == "\ue000\uf8ff"  # the whole BMP area, SpireLM's 5000 in it
    assert units_to_pua([BMP_PUA_SIZE, BMP_PUA_SIZE + 65533, BMP_PUA_SIZE + 65534, MAX_UNITS - 1], dedup=False) == (
        "\U000f0000\U000ffffd\U00100000\U0010fffd"
    )
    every = list(range(MAX_UNITS))
    assert pua_to_units(units_to_pua(every, dedup=False)) == every
    units = [3, 3, 3, 9, 9, 3]
    assert units_to_pua(units) == "\ue003\ue009\ue003" and pua_to_units(units_to_pua(units)) == collapse(units)[0]
    with pytest.raises(ValueError, match="beyond the private-use areas"):
        units_to_pua([MAX_UNITS])
    with pytest.raises(ValueError, match="negative"):
        units_to_pua([-1])
    with pytest.raises(ValueError, match=r"character 1 \(U\+0041\)"):
        pua_to_units("\ue000A")
    check_unit_count(5000)
    with pytest.raises(ValueError, match="at most 137468"):
        check_unit_count(MAX_UNITS + 1)


def _round_trips(tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert pua_to_units(tokenizer.decode(ids)) == pua_to_units(text)


def _unit_strings() -> list[str]:
    return [units_to_pua(_random_units(s, k)) for s, k in ((0, 5000), (1, 6400), (2, MAX_UNITS), (3, 50))]


def test_units_round_trip_through_a_byte_level_bpe_tokenizer():
    from demo.tiny import train_tokenizer

    strings = _unit_strings()
    tokenizer = train_tokenizer(["zero one two three"] + strings[:1], vocab_size=400)
    _round_trips(tokenizer, strings)


def test_units_round_trip_through_whisper_tiny_en_tokenizer():
    from transformers import AutoTokenizer

    from models.pretrained_whisper import pretrained_whisper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = pretrained_whisper()
    if folder is None:
        pytest.skip("needs the pretrained extra (Whisper tiny.en)")
    _round_trips(AutoTokenizer.from_pretrained(folder), _unit_strings())
