#!/usr/bin/env bash
# Set up (scripts/setup.sh) and compare the three stage-1 tokenizers (Speechless RVQ, Ichigo's
# WhisperVQ, SpireLM's k-means units) on the pretrained Whisper tiny.en, through stages 1-3 on FSDD
# (../shared/data/fsdd, held-out speaker) and english_clips. Extra arguments go to
# `python -m demo.compare` (e.g. --tokenizers rvq,kmeans, --takes 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m demo.compare "$@"
