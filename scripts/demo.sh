#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole pipeline on the embedded demo corpus:
# corpus -> shards -> stage 1 (fit, promote, tokenize) -> stage 2 (fit, promote, synthesize)
# -> stage 3 (fit, promote, answer held-out speakers), on a tiny random Gemma 4 encoder and on the
# pretrained Whisper tiny.en (the `pretrained` extra, converted once). Extra arguments go to
# `python -m demo` (e.g. --encoder gemma4-tiny, --corpus fsdd, --stage3-on both).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m demo "$@"
