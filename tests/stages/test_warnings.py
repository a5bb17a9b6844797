"""Clean output: the commands a user runs show no warnings of ours, and no deprecated calls of ours.

Each test records every warning (``warnings`` set to "always") and every warning transformers logs,
then removes the few that third-party code raises on its own, each named below with why, and asserts
that nothing is left: a DeprecationWarning, FutureWarning or UserWarning that remains is ours to fix.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

# (file that warns, message pattern) of warnings that no call of ours causes, each with why.
THIRD_PARTY = [
    # Lightning's own pytree helper calls torch's deprecated LeafSpec check.
    (r"lightning/pytorch/utilities/_pytree\.py", r"isinstance\(treespec, LeafSpec\)` is deprecated"),
    # LightningCLI's own calls into jsonargparse 4.49 (add_instantiator, instantiate_classes, skip_none).
    (r"lightning/pytorch/cli\.py", r"deprecated in v4\.49\.0|only one JsonargparseDeprecationWarning per type"),
    # peft reads transformers' deprecated `is_gradient_checkpointing` while wrapping the model.
    (r"transformers/modeling_utils\.py", r"`is_gradient_checkpointing` is deprecated"),
    # LightningCLI called in-process with args while pytest's own argv is set: an artifact of this test.
    (r"lightning/pytorch/cli\.py", r"LightningCLI's args parameter is intended to run from within Python"),
    # Intended: the frozen encoder (and a frozen LLM base) stay in eval mode while the RVQ / LoRA train.
    (r"lightning/pytorch/loops/fit_loop\.py", r"module\(s\) in eval mode at the start of training"),
    # The test configs' tiny data: few batches, no DataLoader workers (the shipped configs set both).
    (r"lightning/pytorch/", r"smaller than the logging interval|does not have many workers"),
]


class _Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def recorded():
    """Every ``warnings`` warning (always shown) and every transformers log message at WARNING or above."""
    from transformers.utils import logging as hf_logging

    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings: show them again
    handler, logger = _Logged(), hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.messages
    finally:
        logger.removeHandler(handler)


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    """The recorded warnings that no THIRD_PARTY entry explains."""
    left = []
    for w in caught:
        where = str(w.filename).replace("\\", "/")
        if any(re.search(f, where) and re.search(m, str(w.message)) for f, m in THIRD_PARTY):
            continue
        left.append(f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}")
    return left


def test_fit_and_a_test_without_logger_warn_nothing_of_ours(tiny_corpus, make_stage1_config, tmp_path, monkeypatch):
    from stages.cli import main as cli

    torch.set_num_threads(1)
    config = make_stage1_config(tiny_corpus, tmp_path / "run", max_epochs=1)
    with recorded() as (caught, logged):
        cli(["fit", "--config", str(config)])
        # Another folder and no logger: ModelCheckpoint's folder resolves to ./checkpoints, not the
        # run's (Lightning warned "The dirpath has changed" when it restored the fit's record).
        monkeypatch.chdir(tmp_path)
        ckpt = tmp_path / "run" / "stage1" / "version_0" / "checkpoints" / "averaged.ckpt"
        cli(["test", "--config", str(config), "--trainer.logger", "false", "--ckpt_path", str(ckpt),
             "--data.init_args.test_shards", str(tiny_corpus["val"])])  # fmt: skip
    assert (tmp_path / "run" / "artifacts" / "stage1" / "current").exists()  # the commands did run
    left = ours(caught)
    assert left == [], "\n".join(left)
    assert [m for m in logged if "deprecat" in m.lower()] == []


def test_generation_makes_no_deprecated_cache_call(tmp_path):
    from demo.tiny import gemma3_lm_debug_config, save_gemma4_llm_debug, train_tokenizer
    from models.speech_lm import SpeechLM
    from models.spoken_llm import SpokenLLM

    torch.set_num_threads(1)
    tokenizer = train_tokenizer(["hello world, this is a test", "akwaaba me din de kofi"] * 5, vocab_size=300)
    gemma = save_gemma4_llm_debug(tmp_path / "gemma4", seed=0)
    with recorded() as (caught, logged):
        for form in ("one_level", "all_levels"):  # stage 2's decode loop over the KV cache
            lm = SpeechLM(lm=gemma3_lm_debug_config(len(tokenizer)), tokenizer=tokenizer, num_levels=2, codebook_size=8,
                          output_form=form, max_duration=5)  # fmt: skip
            assert len(lm.generate(["hello world"], max_frames=4)) == 1
        llm = SpokenLLM(model=str(gemma), dtype="fp32", lora_r=2, num_levels=2, codebook_size=8)  # stage 3
        assert len(llm.generate(llm.prompts_from_audio([np.zeros(16000, np.float32)]), max_new_tokens=3)) == 1
    left = ours(caught)
    assert left == [], "\n".join(left)
    assert [m for m in logged if "past_key_values" in m or "deprecat" in m.lower()] == []


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, UserWarning])
def test_the_filter_lets_a_warning_of_ours_through(category):
    with recorded() as (caught, _):
        warnings.warn("some call of ours is deprecated", category, stacklevel=1)
    assert len(ours(caught)) == 1


def test_the_package_metadata_uses_an_spdx_licence():
    """setuptools deprecated ``project.license`` as a table (it warned at every set-up): an SPDX string."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()  # tomllib is 3.11+
    assert re.search(r'^license = "Apache-2\.0"$', text, re.M)
    # PEP 639 license expressions need setuptools 77; an older one would refuse the string.
    assert re.search(r'^requires = \["setuptools>=(7[7-9]|[89]\d)', text, re.M)


def test_the_cli_hides_lightnings_known_notices_and_nothing_else():
    from stages.cli import quiet_known_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notices()
        warnings.warn("Found 3 module(s) in eval mode at the start of training. This may lead to ...", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
        warnings.warn("a warning of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of ours"]
