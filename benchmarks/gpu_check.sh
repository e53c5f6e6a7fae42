#!/usr/bin/env bash
# The GPU check: on one H100/H200 without network, in under 8 minutes, install what the machine lacks,
# build the CUDA kernels for its GPU, run the GPU tests, time lime-1b training through our real DeepSpeed
# step and the peer (a plain PyTorch loop over transformers' GPT-2 with LIME's dims) on the same rows,
# profile one configuration per mode, and measure the kernels; one JSON and one table at the end.
#
#   bash benchmarks/gpu_wheels.sh                    # here, with network, once: the wheelhouse gpu_wheels/
#   bash benchmarks/gpu_check.sh                     # on the GPU machine (carry gpu_wheels/ along)
#   bash benchmarks/gpu_check.sh --only train,peer   # a second call on a warm machine: only these stages
#                                                    #   (install, and build when the extension is missing, still run)
#   bash benchmarks/gpu_check.sh --dry-run           # (or LIME_GPU_CHECK_DRY_RUN=1) every stage's code at tiny
#                                                    #   sizes; without a GPU on the CPU (the test suite runs this)
#
# Stages, each under `timeout` (its own limit, and never past the whole check's budget,
# LIME_GPU_CHECK_BUDGET_S, 470 s by default; a dry run, on a CPU shared with others, gets 4x each limit and a
# 1,800 s budget); a stage that fails or times out is reported and the next one still runs; the report is
# rewritten after every stage, so a check cut short keeps what it measured.
# Expected on an H200 (the first calls' figures where there are some, else estimates): environment, install and
# gpu 20 s; build 85-95 s; train 150-200 s; peer 100-150 s (mostly torch.compile of the whole GPT-2); kernels
# 20-60 s (three ops at three shapes); tests 50 s. The measurements come before the tests: a budget cut short
# loses the tests, which a follow-up `--only tests` on the warm machine runs in about 60 s.
#   environment  python, torch, nvidia-smi, the wheelhouse
#   install      gpu_wheels/*.whl into a private folder (pip --no-index --no-deps); its import check and every
#                later stage see that folder on PYTHONPATH; --dry-run: pip's --dry-run for CPython 3.12 only
#   gpu          a CUDA GPU is visible: its name and compute capability. Without one the check stops here
#                (exit 3), but with --dry-run, which goes on on the CPU
#   build        setup.py build_ext --inplace, the CUDA extension for this GPU's architecture only
#                (on a CPU dry run: the command is printed and the built CPU extension checked)
#   train        benchmarks/bench_gpu_train.py: ours, DeepSpeed ZeRO-1 bf16, eager and compile; one micro-batch
#                per step (16x1, 32x1) and 64 sequences per step (16x4, 32x2, 64x1); packed SFT rows; a
#                torch.profiler pass of 32x2 per mode -> train.json, profile_ours.md
#   peer         benchmarks/bench_gpu_peer.py: the plain GPT-2 loop on the same rows -> peer.json
#   kernels      benchmarks/bench_kernels.py --device cuda (RMSNorm, add + RMSNorm, SiLU in bf16) -> kernels.json
#   tests        tests/test_gpu.py and the CUDA tests of tests/test_kernels.py (on a CPU dry run: test_gpu.py's
#                CPU tests but the DeepSpeed subprocess one, which the normal suite runs)
#   report       benchmarks/gpu_check_report.py: gpu_check.json and the tables, ours / peer per row
#
# Output: $OUT (the device tool's return folder) when set, else gpu_check_out/ (git-ignored): gpu_check.json,
# gpu_check.txt (the tables), gpu_check.log (every stage's full output), train.json, peer.json, kernels.json,
# profile_ours.md. Exit: 0 all stages passed, 1 some failed, 3 no GPU (without --dry-run), 2 bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${LIME_GPU_CHECK_BUDGET_S:-}"
WHEELS="${LIME_GPU_WHEELS:-$REPO/gpu_wheels}"
RESULTS="${OUT:-$REPO/gpu_check_out}"
DRY_RUN="${LIME_GPU_CHECK_DRY_RUN:-0}"
ONLY=""
ALL_STAGES="environment install gpu build train peer kernels tests report"

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
LIMIT_SCALE=1
if [ "$DRY_RUN" = "1" ]; then LIMIT_SCALE=4; fi
[ -z "$BUDGET_S" ] && BUDGET_S=$((DRY_RUN == 1 ? 1800 : 470))
for stage in ${ONLY//,/ }; do
  case " $ALL_STAGES " in *" $stage "*) ;; *) echo "gpu_check: --only $stage: not a stage of: $ALL_STAGES" >&2; exit 2 ;; esac
done

mkdir -p "$RESULTS"
WORK="$(mktemp -d /tmp/lime-gpu-check.XXXXXX)"  # stage logs, the installed wheels
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"
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
  local name="$1" limit=$(($2 * LIMIT_SCALE))
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

# After every stage: gpu_check.json and gpu_check.txt from what the stages left so far.
report() {
  timeout --kill-after=5 60 "$PYTHON" benchmarks/gpu_check_report.py --stages "$STATUS" --work "$WORK" \
    --results "$RESULTS" --dry-run "$DRY_RUN" > "$WORK/report.txt" 2>&1 || cat "$WORK/report.txt"
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
      --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --target "$SITE" \
      "$WHEELS"/*.whl
    return
  fi
  # The import check sees the folder as every later stage does, on PYTHONPATH (the first GPU call checked
  # without it, failed, and left the later stages without deepspeed).
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl && PYTHONPATH="$PYTHONPATH:$SITE" "$PYTHON" -c "
import deepspeed, datasets
print('deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)
print('datasets', datasets.__version__, 'from', datasets.__file__)"
}

gpu() {
  "$PYTHON" - "$WORK/arch" "$DRY_RUN" <<'EOF'
import sys
import torch

if not torch.cuda.is_available():
    if sys.argv[2] == "1":
        print(f"no CUDA GPU visible (torch {torch.__version__}): the dry run goes on on the CPU")
        sys.exit(0)
    sys.exit(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
             f"torch.cuda.is_available() is False): stopping before the first GPU stage")
major, minor = torch.cuda.get_device_capability()
print(f"{torch.cuda.device_count()} GPU(s); cuda:0 is {torch.cuda.get_device_name(0)}, compute capability {major}.{minor}")
open(sys.argv[1], "w").write(f"{major}.{minor}")
EOF
}

build() {
  if [ ! -f "$WORK/arch" ]; then  # a dry run on a CPU: what would run, and the extension that is there
    echo "would run: LIME_BUILD_CUDA=1 LIME_CUDA_ARCHS=<arch> $PYTHON setup.py build_ext --inplace"
    "$PYTHON" -c "from megatron_lime import kernels; print('CPU kernels backend:', kernels.backend('cpu'))"
    return
  fi
  local arch
  arch="$(cat "$WORK/arch")"
  echo "building the extensions in place, CUDA for compute capability $arch only"
  LIME_BUILD_CUDA=1 LIME_CUDA_ARCHS="$arch" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py build_ext --inplace && "$PYTHON" -c \
    "from megatron_lime import kernels; b = kernels.backend('cuda'); print('CUDA kernels backend:', b); assert b == 'fused-cuda', b"
}

tests() {
  if [ ! -f "$WORK/arch" ]; then
    "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 150 -rfEs tests/test_gpu.py -k "not deepspeed"
    return
  fi
  "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 150 -rfEs tests/test_gpu.py tests/test_kernels.py -k "cuda"
}

dry_run_flag() { [ "$DRY_RUN" = "1" ] && echo "--dry-run"; }

train() {
  "$PYTHON" benchmarks/bench_gpu_train.py --json "$RESULTS/train.json" --profile-md "$RESULTS/profile_ours.md" \
    $(dry_run_flag)
}

peer() {
  "$PYTHON" benchmarks/bench_gpu_peer.py --json "$RESULTS/peer.json" $(dry_run_flag)
}

kernels() {
  if [ ! -f "$WORK/arch" ]; then
    "$PYTHON" benchmarks/bench_kernels.py --device cpu --ops rms_norm add_rms_norm silu --dtypes fp32 --rows 64 --hidden 64 \
      --iterations 2 --warmup 1 --json "$RESULTS/kernels.json"
    return
  fi
  "$PYTHON" benchmarks/bench_kernels.py --device cuda --ops rms_norm add_rms_norm silu --dtypes bf16 \
    --json "$RESULTS/kernels.json"
}

# The stages run as `timeout ... bash -c FUNCTION`: they see these functions and variables.
export -f environment install gpu build tests dry_run_flag train peer kernels
export PYTHON WORK WHEELS DRY_RUN RESULTS SITE
say "results in $RESULTS; budget ${BUDGET_S}s$([ "$DRY_RUN" = "1" ] && echo '; dry run: every stage at tiny sizes')"
run_stage environment 60 environment
if run_stage install 90 install && [ "$DRY_RUN" != "1" ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; fi
if ! run_stage gpu 60 gpu; then
  report
  cat "$WORK/report.txt"
  say "no usable CUDA GPU: stopped before the first GPU stage (exit 3); details in $LOG"
  exit 3
fi
report
run_stage build 240 build; report
run_stage train 240 train; report
run_stage peer 200 peer; report
run_stage kernels 150 kernels; report
run_stage tests 150 tests; report
cat "$WORK/report.txt"
if awk -F'\t' '$2 == "failed" || $2 == "timeout" {bad = 1} END {exit !bad}' "$STATUS"; then exit 1; fi
exit 0
