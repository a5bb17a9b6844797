"""Debug-size models for the demo and the tests: every tiny builder in one place (torchtune's ``*_debug()``).

Each ``*_debug_config()`` returns a transformers config of the real architecture at a size that runs on a
laptop CPU in milliseconds; each ``save_*_debug()`` writes a random-weight folder (model, tokenizer,
feature extractor) that ``from_pretrained(path)`` loads exactly like the hub id, so tests, the demo and
real runs share one code path (``../shared/DESIGN.md``: no hub at test time). Nothing here touches the hub.

- speech encoders: :func:`gemma4_audio_debug_config` (and :func:`save_gemma4_audio_debug`),
  :func:`whisper_debug_config` (and :func:`save_whisper_debug`, a tiny Whisper with a trained tokenizer),
  :func:`hubert_debug_config`;
- tokenizers standing in for Gemma's offline: :func:`train_tokenizer` (byte-level BPE, Gemma's turn
  format) and :func:`gemma4_tokenizer_debug` (Gemma 4's special-token strings);
- language models: :func:`gemma3_lm_debug_config` / :func:`save_gemma3_lm_debug` (stage 2, and a
  text-only stage-3 LM), :func:`gemma4_debug_config` / :func:`gemma4_llm_debug_config` /
  :func:`save_gemma4_llm_debug` (a full Gemma 4, audio + text), :func:`save_gemma4_stage3_debug` (the
  demo's stage-3 Gemma 4 whose audio tower is the stage-1 encoder);
- :func:`save_demo_models`: the whole demo set under one folder, also the command
  ``python -m demo.tiny --out DIR --encoder gemma4-tiny --texts FILE`` (what ``speechless-init --tiny``
  prints first).

The builders live in three files by kind, :mod:`demo.tiny_encoders`, :mod:`demo.tiny_tokenizers` and
:mod:`demo.tiny_lms`; this module re-exports every one of them and holds the demo's model set.

Reference figures for the real Gemma 4 audio encoder (the default ``Gemma4AudioConfig``, shipped in
``google/gemma-4-E2B-it`` and ``google/gemma-4-E4B-it``; the 26B-A4B and 31B checkpoints have no
audio tower): a 12-layer USM-style Conformer with ``hidden_size=1024``; 128-bin log-mel at 100 frames/s
(hop 10 ms) subsampled 4x by two stride-2 convolutions, so 25 frames/s (40 ms a frame). Its
``output_proj`` maps 1024 -> ``output_proj_dims=1536``; stage 1 quantizes the 1024-dim *input* of
that projection. The tiny Gemma 4 follows the layout of the audio-capable checkpoints: a
``Gemma4ForConditionalGeneration`` whose audio tower's ``output_proj`` feeds ``embed_audio``, and a
tokenizer whose special tokens carry the real strings (``<|turn>``/``<turn|>``, ``<|audio>``
``<|audio|>`` ``<audio|>``); only the ids differ. The full ``Gemma4Processor`` also needs image and video
processors (the video one needs torchvision), so only the audio feature extractor is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

# The builders live in three files by kind (encoders, tokenizers, language models); every name is
# importable from here, the one module the demo and the tests name.
from demo.tiny_encoders import (
    GEMMA4_AUDIO_DIM,
    GEMMA4_AUDIO_FRAME_RATE,
    gemma4_audio_debug_config,
    hubert_debug_config,
    save_gemma4_audio_debug,
    save_whisper_debug,
    whisper_debug_config,
)
from demo.tiny_lms import (
    REAL_MODEL_ID,
    gemma3_lm_debug_config,
    gemma4_debug_config,
    gemma4_llm_debug_config,
    gemma4_text_debug_config,
    save_gemma3_lm_debug,
    save_gemma4_llm_debug,
    save_gemma4_stage3_debug,
)
from demo.tiny_tokenizers import (
    BASE_SPECIAL_TOKENS,
    GEMMA4_CHAT_TEMPLATE,
    GEMMA4_SPECIAL_TOKENS,
    GEMMA_CHAT_TEMPLATE,
    gemma4_tokenizer_debug,
    train_tokenizer,
)

__all__ = [
    "BASE_SPECIAL_TOKENS",
    "GEMMA4_AUDIO_DIM",
    "GEMMA4_AUDIO_FRAME_RATE",
    "GEMMA4_CHAT_TEMPLATE",
    "GEMMA4_SPECIAL_TOKENS",
    "GEMMA_CHAT_TEMPLATE",
    "REAL_MODEL_ID",
    "gemma3_lm_debug_config",
    "gemma4_audio_debug_config",
    "gemma4_debug_config",
    "gemma4_llm_debug_config",
    "gemma4_text_debug_config",
    "gemma4_tokenizer_debug",
    "hubert_debug_config",
    "main",
    "save_demo_models",
    "save_gemma3_lm_debug",
    "save_gemma4_audio_debug",
    "save_gemma4_llm_debug",
    "save_gemma4_stage3_debug",
    "save_whisper_debug",
    "train_tokenizer",
    "whisper_debug_config",
]


# ---- the demo's model set -------------------------------------------------------------------------

ENCODERS = ("gemma4-tiny", "whisper-tiny")


def demo_model_paths(out: str | Path, encoder: str) -> dict[str, str]:
    """Where :func:`save_demo_models` puts each model under ``out`` (``encoder``, ``stage2_lm``, ``stage3_llm``)."""
    root = Path(out)
    if encoder == "gemma4-tiny":
        return {"encoder": str(root / "gemma4_audio"), "stage2_lm": str(root / "stage2_lm"),
                "stage3_llm": str(root / "gemma4_stage3")}  # fmt: skip
    return {"encoder": str(root / "whisper-tiny.en"), "stage2_lm": str(root / "stage2_lm"),
            "stage3_llm": str(root / "stage3_text_lm")}  # fmt: skip


def save_demo_models(out: str | Path, encoder: str, texts: list[str]) -> dict[str, str]:
    """The demo-size models under ``out`` (each built once; kept on a re-run); returns their folders.

    A one-layer Gemma 4 audio encoder with 32 subsampling channels (one layer and 32 channels keep a random
    encoder's states word-discriminative), or the pretrained Whisper tiny.en of the ``pretrained`` extra;
    a 4-layer 128-dim Gemma 3 for stage 2; for stage 3 a tiny Gemma 4 whose audio tower is the stage-1
    encoder, or a 2-layer 64-dim Gemma 3 reading Whisper states through a projector. Tokenizers are
    trained on ``texts``.

    Raises:
        FileNotFoundError: ``whisper-tiny`` without the ``pretrained`` extra.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars for folders of a few MB
    paths = demo_model_paths(out, encoder)
    enc, lm, llm = (Path(paths[k]) for k in ("encoder", "stage2_lm", "stage3_llm"))
    if encoder == "gemma4-tiny":
        if not (enc / "config.json").exists():
            save_gemma4_audio_debug(enc, seed=0, num_hidden_layers=1, subsampling_conv_channels=[128, 32])
    elif not (enc / "config.json").exists():
        from models.pretrained_whisper import pretrained_whisper

        if pretrained_whisper(cache_dir=enc.parent) is None:
            raise FileNotFoundError("--encoder whisper-tiny needs the `pretrained` extra (pip install -e '.[pretrained]')")
    if not (lm / "config.json").exists():
        save_gemma3_lm_debug(lm, texts, hidden_size=128, num_layers=4)
    if not (llm / "config.json").exists():
        if encoder == "gemma4-tiny":
            save_gemma4_stage3_debug(llm, encoder_dir=enc, texts=texts)
        else:
            save_gemma3_lm_debug(llm, texts, hidden_size=64, num_layers=2)
    return paths


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Tokenizer text from files: a JSONL's ``instruction`` and ``response`` of each record, else one text a line."""
    texts: list[str] = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            if str(path).endswith(".jsonl"):
                rec = json.loads(line)
                texts += [rec["instruction"], rec["response"]]
            else:
                texts.append(line)
    return texts


def main(argv: list[str] | None = None) -> int:
    """``python -m demo.tiny``: build the demo-size models (:func:`save_demo_models`); prints their folders."""
    parser = argparse.ArgumentParser(prog="python -m demo.tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder of the models (e.g. runs/NAME/models)")
    parser.add_argument("--encoder", choices=ENCODERS, default="gemma4-tiny", help="the stage-1 encoder")
    parser.add_argument("--texts", nargs="+", required=True,
                        help="tokenizer text: .jsonl files (instruction, response) or text files (one a line)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        paths = save_demo_models(args.out, args.encoder, read_texts(args.texts))
    except FileNotFoundError as err:
        print(f"python -m demo.tiny: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
