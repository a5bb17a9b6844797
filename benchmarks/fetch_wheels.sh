#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels benchmarks/gpu.sh installs on a GPU machine that has
# torch, lightning, transformers, peft, torchmetrics and tensorboard but no package index. Not fetched:
# whisper-normalizer, datasets, espeakng-loader (only `speechless-infer`, Hugging Face dataset folders
# and the demo TTS import them).
#   bash benchmarks/fetch_wheels.sh            # -> wheels/ (gitignored), a few MiB
# Only what `python -m stages` imports beyond those packages, with their small dependencies, each for
# CPython 3.10-3.13 on manylinux x86_64 (compiled ones: soxr, cffi). numpy, pyyaml, safetensors,
# tokenizers, psutil come with torch/transformers/lightning and are not fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
mkdir -p "$DEST"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PKGS=(
  "jsonargparse>=4.30" docstring-parser typeshed-client importlib-resources  # jsonargparse[signatures]
  "soundfile>=0.12" cffi pycparser                                          # FLAC shards
  "soxr>=0.4"                                                               # resampling
  "webdataset>=0.2.100" braceexpand                                         # shard reading helpers
  "rich>=13" markdown-it-py mdurl pygments                                  # tables and progress
)
for ver in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --only-binary=:all: --no-deps --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$ver" \
    --implementation cp --dest "$DEST" "${PKGS[@]}"
done
du -sh "$DEST"
ls "$DEST"
