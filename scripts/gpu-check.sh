#!/usr/bin/env bash
# The GPU check, in at most 8 minutes on one CUDA GPU:
#   1. tests/test_cuda.py: the fused cross-entropy (fp32, bf16 autocast), fp32 ranking inside bf16
#      autocast, every registered model trained an epoch in fp32 and bf16, and the same weights
#      ranked on the GPU and on the CPU giving identical rank arrays;
#   2. a short SASRec run on Toys (harness train ... --device cuda --epochs 3);
#   3. harness bench --models all on Toys in fp32, then in bf16 (--batches and --lid-epochs 1 small).
# Each step has its own timeout, capped by what is left of the whole budget (GPU_CHECK_BUDGET,
# default 465 s), so the script ends within 8 minutes however the steps go. Every output goes to
# $OUT (default ./gpu-check-out): summary.txt (one line per step: status, seconds, the lines that
# matter) and one log per step. Without CUDA it says so in one line, writes the cuda tests'
# skip report and exits 0.
#
#   scripts/gpu-check.sh                                  # Toys from $DATA, else ../shared/data
#   OUT=/tmp/check DATA=/data PYTHON=.venv/bin/python scripts/gpu-check.sh
#
# Needs the project's Python dependencies (pip install -e '.[test]'); the repo root is put on
# PYTHONPATH, so an install of the package itself is optional. Exit status: 0 when every step
# that ran passed or was skipped for want of CUDA or data, 1 otherwise.
set -u
OUT=${OUT:-./gpu-check-out}  # OUT and DATA as given: from the caller's directory
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
DATA=${DATA:-${HARNESS_DATA_DIR:-}}
[ -n "$DATA" ] && [ -d "$DATA" ] && DATA=$(cd "$DATA" && pwd)
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}  # the default: beside the repository, as the README's commands
PY=${PYTHON:-python3}
BATCHES=${GPU_CHECK_BATCHES:-20}
BUDGET=${GPU_CHECK_BUDGET:-465}
SUMMARY=$OUT/summary.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # caches and run records: not in $OUT
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HARNESS_CACHE_DIR="$WORK/cache"
HARNESS=("$PY" -m harness --cache-dir "$WORK/cache" --results-dir "$WORK/results")
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }
note() { echo "$*" >>"$SUMMARY"; }  # the summary only

# step NAME CAP COMMAND...: run with timeout min(CAP, budget left), output in $OUT/NAME.log. On
# SIGTERM harness finishes the epoch in flight first, so it gets 10 s more, then SIGKILL: the
# budget counts those 10 s.
step() {
  local name=$1 cap=$2 left rc t0
  shift 2
  left=$((BUDGET - SECONDS - 10))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 10 ]; then
    say "$name: SKIPPED (out of time: $((BUDGET - SECONDS))s of the ${BUDGET}s budget left)"
    failed=1
    return
  fi
  t0=$SECONDS
  timeout -k 10 "$cap" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) say "$name: ok ($((SECONDS - t0))s)" ;;
    124 | 137) say "$name: TIMED OUT after ${cap}s (partial output in $name.log)"; failed=1 ;;
    *) say "$name: FAILED rc=$rc ($((SECONDS - t0))s; see $name.log)"; failed=1 ;;
  esac
}

: >"$SUMMARY"
note "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! cuda=$("$PY" -c 'import torch
print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1); then
  say "cannot import torch with $PY: $(echo "$cuda" | tail -n 1)"
  exit 1
fi
read -r torch_version gpu_name <<<"$(echo "$cuda" | tail -n 1)"
if [ -z "${gpu_name:-}" ]; then
  say "no CUDA on this machine (torch $torch_version): GPU checks skipped; the cuda tests' skip report is in cuda-tests.log"
  "$PY" -m pytest tests/test_cuda.py -p no:cacheprovider -rs >"$OUT/cuda-tests.log" 2>&1
  exit 0
fi
say "torch $torch_version on $gpu_name"
! command -v nvidia-smi >/dev/null || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$SUMMARY" 2>&1

# 1. the cuda tests (the CPU/GPU rank comparison included)
step cuda-tests 120 "$PY" -m pytest tests/test_cuda.py -p no:cacheprovider -rs --durations=5
grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped|errors?)" "$OUT/cuda-tests.log" | tail -n 12 | sed 's/^/  /' >>"$SUMMARY"

# 2-3. Toys: a short SASRec run, then every model's bench in fp32 and in bf16
if [ -f "$DATA/toys/Toys_and_Games.txt" ]; then
  step train-sasrec-toys 80 "${HARNESS[@]}" train --model sasrec --dataset toys --data-dir "$DATA" --device cuda \
    --epochs 3
  grep -E "^sasrec on toys|(valid|test) +│|per training epoch" "$OUT/train-sasrec-toys.log" | sed 's/^/  /' >>"$SUMMARY"
  for precision in fp32 bf16; do
    step "bench-$precision" 140 "${HARNESS[@]}" bench --models all --dataset toys --data-dir "$DATA" --device cuda \
      --precision "$precision" --batches "$BATCHES" --lid-epochs 1
    log=$OUT/bench-$precision.log
    if grep -q "^ *bench: " "$log" 2>/dev/null; then  # the table: one row per model
      sed -n '/^ *bench: /,$p' "$log" >>"$SUMMARY"
    elif [ -f "$log" ]; then
      grep -E "^bench " "$log" | tail -n 1 | sed 's/^/  last started: /' >>"$SUMMARY"
    fi
  done
else
  say "Toys not found at $DATA/toys/Toys_and_Games.txt: train and bench skipped (set DATA=...)"
fi
say "total $((SECONDS))s; $([ "$failed" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit "$failed"
