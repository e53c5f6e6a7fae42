#!/usr/bin/env bash
# The GPU check: on one H100/H200 without network, in under 8 minutes, install what the machine
# lacks, build the CUDA kernels for its GPU, run the GPU tests and measure kernels and lime-1b
# training; one JSON and one table at the end.
#
#   bash benchmarks/gpu_wheels.sh              # here, with network, once: the wheelhouse gpu_wheels/
#   bash benchmarks/gpu_check.sh               # on the GPU machine (carry gpu_wheels/ along)
#   bash benchmarks/gpu_check.sh --dry-run     # (or LIME_GPU_CHECK_DRY_RUN=1) stop after the GPU check:
#                                              #   on a CPU machine it fails there (exit 3, "no CUDA GPU")
#   bash benchmarks/gpu_check.sh --only train  # a second call: only these stages (install, and build
#                                              #   when the extension is missing, still run)
#
# Stages, each under `timeout` (its own limit, and never past the whole check's budget,
# LIME_GPU_CHECK_BUDGET_S, 470 s by default); a stage that fails or times out is reported and the
# next one still runs:
#   environment  python, torch, nvidia-smi, the wheelhouse
#   install      gpu_wheels/*.whl into a private folder (pip --no-index --no-deps), on PYTHONPATH;
#                with --dry-run only pip's --dry-run for CPython 3.12 (proves the wheelhouse installs)
#   gpu          a CUDA GPU is visible: its name and compute capability. Without one the check stops
#                here (exit 3): every later stage needs it
#   build        setup.py build_ext --inplace, the CUDA extension for this GPU's architecture only
#   tests        tests/test_gpu.py and the CUDA tests of tests/test_kernels.py
#   kernels      benchmarks/bench_kernels.py --device cuda (RMSNorm and SiLU in bf16)
#   train        benchmarks/bench_gpu_train.py (lime-1b, DeepSpeed ZeRO-1 bf16, eager and compile)
#   report       benchmarks/gpu_check_report.py: $OUT/gpu_check.json and the table
#
# Output: $OUT (the device tool's return folder) when set, else gpu_check_out/ (git-ignored):
# gpu_check.json and gpu_check.log (every stage's full output). Exit: 0 all stages passed,
# 1 some failed, 3 no GPU, 2 bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${LIME_GPU_CHECK_BUDGET_S:-470}"
WHEELS="${LIME_GPU_WHEELS:-$REPO/gpu_wheels}"
RESULTS="${OUT:-$REPO/gpu_check_out}"
DRY_RUN="${LIME_GPU_CHECK_DRY_RUN:-0}"
ONLY=""
ALL_STAGES="environment install gpu build tests kernels train report"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for stage in ${ONLY//,/ }; do
  case " $ALL_STAGES " in *" $stage "*) ;; *) echo "gpu_check: --only $stage: not a stage of: $ALL_STAGES" >&2; exit 2 ;; esac
done

mkdir -p "$RESULTS"
WORK="$(mktemp -d /tmp/lime-gpu-check.XXXXXX)"  # stage logs, the benchmarks' JSON, the installed wheels
trap 'rm -rf "$WORK"' EXIT
LOG="$RESULTS/gpu_check.log"
STATUS="$WORK/stages.tsv"
: > "$LOG"
: > "$STATUS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

say() { echo "[gpu_check $(printf '%3d' $((SECONDS - START)))s] $*"; }

wanted() {  # environment, install, gpu and report always run; --only picks among the others
  case "$1" in environment|install|gpu|report) return 0 ;; esac
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  # A fresh machine has no extension built for this Python: later stages need it.
  if [ "$1" = build ] && ! "$PYTHON" -c "import megatron_lime._kernels_cuda" >/dev/null 2>&1; then return 0; fi
  return 1
}

# run_stage NAME LIMIT_S COMMAND...: the command under timeout (LIMIT_S, cut to what is left of
# the budget), its output appended to the log, one status line, the log's tail when it failed.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  if ! wanted "$name"; then
    printf '%s\tskipped\t0\tnot in --only\n' "$name" >> "$STATUS"
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped, the ${BUDGET_S}s budget is spent"
    printf '%s\tskipped\t0\tbudget spent\n' "$name" >> "$STATUS"
    return 1
  fi
  say "$name: running (limit ${limit}s) ..."
  local began=$SECONDS rc
  echo "===== stage $name: $* (limit ${limit}s)" >> "$LOG"
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1 < /dev/null
  rc=$?
  cat "$WORK/$name.log" >> "$LOG"
  local took=$((SECONDS - began)) status="ok" detail=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timeout"; detail="stopped after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    status="failed"; detail="exit $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-200 | tr '\t' ' ')"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$detail" >> "$STATUS"
  say "$name: $status in ${took}s${detail:+ ($detail)}"
  if [ "$status" != "ok" ]; then
    tail -n 25 "$WORK/$name.log" | sed 's/^/    | /'
  fi
  [ "$status" = "ok" ]
}

report() {
  timeout --kill-after=5 60 "$PYTHON" benchmarks/gpu_check_report.py --stages "$STATUS" --work "$WORK" \
    --json "$RESULTS/gpu_check.json" --dry-run "$DRY_RUN"
}

environment() {
  echo "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else echo "nvidia-smi: not found"; fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then ls -1 "$WHEELS"; else echo "wheelhouse $WHEELS: none"; fi
}

install() {
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheelhouse at $WHEELS: run benchmarks/gpu_wheels.sh (with network) and carry gpu_wheels/"
    return 1
  fi
  if [ "$DRY_RUN" = "1" ]; then  # this machine's Python may not be the GPU machine's 3.12
    "$PYTHON" -m pip install --dry-run --no-index --no-deps --ignore-installed --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --target "$WORK/site" \
      "$WHEELS"/*.whl
    return
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl && "$PYTHON" -c "import deepspeed, datasets; print('deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)"
}

gpu() {
  "$PYTHON" - "$WORK/arch" <<'EOF'
import sys
import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
             f"torch.cuda.is_available() is False): stopping before the first GPU stage")
major, minor = torch.cuda.get_device_capability()
print(f"{torch.cuda.device_count()} GPU(s); cuda:0 is {torch.cuda.get_device_name(0)}, compute capability {major}.{minor}")
open(sys.argv[1], "w").write(f"{major}.{minor}")
EOF
}

build() {
  local arch
  arch="$(cat "$WORK/arch")"
  echo "building the extensions in place, CUDA for compute capability $arch only"
  LIME_BUILD_CUDA=1 LIME_CUDA_ARCHS="$arch" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py build_ext --inplace && "$PYTHON" -c \
    "from megatron_lime import kernels; b = kernels.backend('cuda'); print('CUDA kernels backend:', b); assert b == 'fused-cuda', b"
}

tests() {
  "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 150 -rfEs tests/test_gpu.py tests/test_kernels.py -k "cuda"
}

kernels() {
  "$PYTHON" benchmarks/bench_kernels.py --device cuda --ops rms_norm silu --dtypes bf16 --json "$WORK/kernels.json"
}

train() {
  "$PYTHON" benchmarks/bench_gpu_train.py --json "$WORK/train.json"
}

# The stages run as `timeout ... bash -c FUNCTION`: they see these functions and variables.
export -f environment install gpu build tests kernels train
export PYTHON WORK WHEELS DRY_RUN
say "results in $RESULTS; budget ${BUDGET_S}s$([ "$DRY_RUN" = "1" ] && echo '; dry run: stops after the GPU check')"
run_stage environment 60 environment
run_stage install 90 install && export PYTHONPATH="$PYTHONPATH:$WORK/site"
if ! run_stage gpu 60 gpu; then
  report
  say "no usable CUDA GPU: stopped before the first GPU stage (exit 3); details in $LOG"
  exit 3
fi
if [ "$DRY_RUN" = "1" ]; then
  report
  say "dry run: a GPU is present; the GPU stages (build, tests, kernels, train) would run now"
  exit 0
fi
run_stage build 240 build
run_stage tests 180 tests
run_stage kernels 150 kernels
run_stage train 400 train
report
if awk -F'\t' '$2 == "failed" || $2 == "timeout" {bad = 1} END {exit !bad}' "$STATUS"; then exit 1; fi
exit 0
