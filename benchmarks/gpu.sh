#!/usr/bin/env bash
# GPU suite, one script, about 7 minutes on one H100/H200 (untested on a GPU so far):
#   1. the real-size rehearsal (benchmarks/real_size.py) on cuda in bf16 at the configs' real batch
#      sizes: stage 1 (Gemma 4 audio encoder + RVQ 8x2048x1024, 600 s of audio a batch), tokenization,
#      stage 2 (Gemma 3 270M, 600 s of tokens a batch), synthesis (16 texts x 750 frames), stage 3
#      (Gemma 4 E4B + LoRA, 8 examples a micro-batch, accumulate 4);
#   2. benchmarks/bench_rvq.py --device cuda --dtype bf16;
#   3. benchmarks/bench_synthesis.py --device cuda --dtype bf16.
# Every part has its own time limit; a part that fails or times out is recorded in the JSON and the
# others still run. Result: <out>/gpu_results.json (+ one log per part).
#
#   bash benchmarks/fetch_wheels.sh          # first, where PyPI is reachable: wheels/ (~6 MiB)
#   bash benchmarks/gpu.sh [OUT_DIR]         # on the GPU machine; OUT_DIR defaults to $OUT, else runs/gpu
# Environment: PYTHON (default python), STAGE3_MODEL (gemma-4-E4B-it), REAL_SIZE_LIMIT (360 s),
# BENCH_LIMIT (45 s per benchmark), DEVICE (cuda), RVQ_FRAMES (32000), WORK (runs/real_size: models, data, logs), REAL_SIZE_ARGS (extra
# real_size.py options, e.g. "--stages stage1,stage3").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
OUT_DIR="${1:-${OUT:-runs/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
STAGE3_MODEL="${STAGE3_MODEL:-gemma-4-E4B-it}"
DEVICE="${DEVICE:-cuda}"        # cpu only to try the script's plumbing on a machine without a GPU
RVQ_FRAMES="${RVQ_FRAMES:-32000}"
REAL_SIZE_LIMIT="${REAL_SIZE_LIMIT:-360}"
BENCH_LIMIT="${BENCH_LIMIT:-45}"
WORK="${WORK:-runs/real_size}"  # models (E4B: 16 GB), data, logs: kept out of OUT_DIR
REAL_SIZE_ARGS="${REAL_SIZE_ARGS:-}"
# The project runs from the working tree (no install: the machine's `lightning` command is
# Lightning's own, so stages run as `python -m stages`).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PARTS="$OUT_DIR/parts.tsv"
: > "$PARTS"
START=$(date +%s)

# part NAME LIMIT_S CMD...: run CMD under a time limit, log to OUT_DIR/NAME.log, record the outcome.
part() {
  local name="$1" limit="$2" t0 rc
  shift 2
  t0=$(date +%s)
  echo "[gpu.sh] $name (limit ${limit} s)"
  set +e
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  set -e
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$PARTS"
  echo "[gpu.sh] $name: exit $rc in $(( $(date +%s) - t0 )) s"
}

# 0. What the machine lacks, from the wheels brought along (never from an index).
deps() {
  local missing=()
  "$PY" -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null || missing+=(jsonargparse docstring-parser typeshed-client importlib-resources)
  "$PY" -c "import soundfile" 2>/dev/null || missing+=(soundfile cffi pycparser)
  "$PY" -c "import soxr" 2>/dev/null || missing+=(soxr)
  "$PY" -c "import webdataset" 2>/dev/null || missing+=(webdataset braceexpand)
  "$PY" -c "import rich" 2>/dev/null || missing+=(rich markdown-it-py mdurl pygments)
  if [ "${#missing[@]}" -gt 0 ]; then
    [ -d wheels ] || { echo "missing ${missing[*]} and no wheels/ folder: run benchmarks/fetch_wheels.sh first"; return 1; }
    "$PY" -m pip install --no-index --no-deps --find-links wheels "${missing[@]}"
  fi
  "$PY" -c "import stages.cli, stages.profiling, datamodules.speech, models.speech_lm, models.spoken_llm; print('imports ok')"
}
export -f deps
export PY
part deps 120 bash -c deps
part device 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"

# 1. Real-size rehearsal (models built on the GPU, then saved: ~16 GB of disk for E4B).
# shellcheck disable=SC2086
part real_size "$REAL_SIZE_LIMIT" "$PY" benchmarks/real_size.py --device "$DEVICE" --stage3-model "$STAGE3_MODEL" \
  --steps 5 --timeout 150 --work "$WORK" --out "$OUT_DIR/real_size.json" $REAL_SIZE_ARGS

# 2. RVQ step and encode at 32k frames (vector-quantize-pytorch only when installed).
VQP=--skip-vqp
"$PY" -c "import vector_quantize_pytorch" 2>/dev/null && VQP=
# shellcheck disable=SC2086
part bench_rvq "$BENCH_LIMIT" "$PY" benchmarks/bench_rvq.py --device "$DEVICE" --dtype bf16 --frames "$RVQ_FRAMES" --repeats 5 \
  $VQP --json "$OUT_DIR/bench_rvq.json"

# 3. Batched synthesis vs a per-text HF generate loop.
part bench_synthesis "$BENCH_LIMIT" "$PY" benchmarks/bench_synthesis.py --device "$DEVICE" --dtype bf16 --batch 64 \
  --frames 250 --hf-texts 4 --json "$OUT_DIR/bench_synthesis.json"

# One JSON: each part's exit status and time, its figures, the tail of a failed part's log.
"$PY" - "$OUT_DIR" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

out, start = Path(sys.argv[1]), float(sys.argv[2])
result = {"date": time.strftime("%Y-%m-%d"), "total_s": time.time() - start, "parts": {}}
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    rc = int(rc)
    entry = {"exit": rc, "seconds": int(seconds), "limit_s": int(limit),
             "status": "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"}
    figures = out / f"{name}.json"
    if figures.exists():
        entry["results"] = json.loads(figures.read_text())
    log = out / f"{name}.log"
    if rc != 0 and log.exists():
        entry["log_tail"] = log.read_text(errors="replace")[-4000:]
    if name == "device" and log.exists():
        entry["log"] = log.read_text(errors="replace")[-2000:]
    result["parts"][name] = entry
(out / "gpu_results.json").write_text(json.dumps(result, indent=1, default=str))
table = result["parts"].get("real_size", {}).get("results", {}).get("table")
if table:
    print(table)
print(json.dumps({k: v["status"] for k, v in result["parts"].items()}))
print(f"[gpu.sh] {out / 'gpu_results.json'}")
EOF
