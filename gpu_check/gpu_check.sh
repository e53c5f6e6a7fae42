#!/usr/bin/env bash
# The GPU check: on one H100/H200 without network, install what the machine lacks, build the CUDA kernels for its
# GPU, and time lime-1b training through our real DeepSpeed step (the recipe's DeepSpeed config file, both
# precisions) beside the peer (a plain PyTorch loop over transformers' GPT-2 with LIME's dims); a second call
# measures the kernels and runs the GPU tests. One JSON (ours / peer as numbers) and one table at the end.
#
#   bash gpu_check/gpu_wheels.sh                        # here, with network, once: the wheelhouse gpu_wheels/
#   bash gpu_check/gpu_check.sh                         # call 1 on the GPU machine (carry gpu_wheels/): the
#                                                       #   headline rows (stages peer and train)
#   bash gpu_check/gpu_check.sh --only kernels,tests    # call 2: the kernels and the GPU tests (add ",profile"
#                                                       #   for the torch.profiler pass of our step)
#   bash gpu_check/gpu_check.sh --all                   # every stage in one call (est. 6.5-8.5 min of script:
#                                                       #   for a lease longer than a session's 15 minutes)
#   bash gpu_check/gpu_check.sh --dry-run               # (or LIME_GPU_CHECK_DRY_RUN=1) every stage's code at tiny
#                                                       #   sizes; without a GPU on the CPU (the test suite runs this)
#
# The headline rows: ours and the peer at the recipe's batch, 64 sequences per GPU per step (global 512 on 8 GPUs)
# as the recipe runs it, 4 micro-batches of 16 (LIME_GPU_CHECK_SHAPES, default "16x4"; "16x4 32x2" adds the
# 2 x 32 rows, est. +90-150 s: a second compiled shape in each compiled process); eager and torch.compile; ours in both precisions (bf16: DeepSpeed's bf16 mode, bf16
# weights + fp32 master; autocast: DeepSpeed's torch_autocast, fp32 weights + bf16 compute, the model card's
# mixed fp32/bf16), the peer in its one mode (fp32 weights + torch.autocast bf16). One micro-batch per step rows
# are optional (add "16x1 32x1" to LIME_GPU_CHECK_SHAPES); 64x1 is left out: the peer's 64-sequence micro-batch
# is expected not to fit on an 80 GB GPU (its 32-sequence one took 52.3 GiB on the H200; not yet tried). A row
# that does not fit in memory is reported as OOM and the next one runs.
#
# Seconds per stage on an H100/H200 (measured: the H200 calls of 2026-12-04, ../shared/gpu/MEASURED.md; the
# rest ESTIMATED, not yet run on a GPU):
#   call 1 (default)         machine start 60-120 s (the device tool's, not this script's)
#     environment+install+gpu   17 s measured (4 + 8 + 5)
#     build                     85-95 s measured; runs in the background while the peer loads and compiles
#     peer                      est. 90-130 s: one process, 15 s start, torch.compile of the whole GPT-2 at one
#                               shape 60-90 s (overlapping the build), then waits for the build to end before
#                               it times anything; 2 + 4 steps per row at about 0.55 s per step
#     train                     est. 130-180 s: 4 processes (bf16 eager, bf16 compile, autocast eager, autocast
#                               compile), each about 12-20 s start (imports, lime-1b on the GPU, DeepSpeed, the
#                               matmul rate) + the kernel choice plan (1-2 s eager; est. 10-20 s compiled, which
#                               compiles PyTorch's ops to time them) + 2 + 4 steps of about 0.55 s; the compiled
#                               ones about 15-30 s more for the blocks (one graph serves the 32 blocks)
#     total                     est. 4.3-5.5 min of script; with the machine's start 5.3-7 min: at or a little
#                               over the 6-minute aim. The first GPU call replaces these estimates with its
#                               stage times (gpu_check.json's "stages", the children's "wall_seconds" in train.json)
#   call 2 (--only kernels,tests): build 85-95 s measured (a fresh machine), kernels est. 30-60 s (26 s measured
#     for three ops at one shape; now three shapes), tests 41-47 s measured (+ est. 20-40 s for test_attention.py's
#     two compiled FlexAttention tests): est. 3-4 min, 4-5.5 min with the start
#   profile (optional): est. 30-40 s (one process, the recipe's configuration: bf16, eager, 16x4; 2 profiled steps)
#
# Stages, each under `timeout` (its own limit, and never past the whole check's budget, LIME_GPU_CHECK_BUDGET_S:
# 480 s by default, so a slow call 1 still leaves device time for call 2; 570 s with --all, inside the device
# tool's 600 s per call; a dry run, on a CPU shared with others, gets 4x each limit and a 1,800 s budget); a stage
# that fails or times out is reported and the next one still runs; the report is rewritten after every stage, so a
# check cut short keeps what it measured.
#   environment  python, torch, nvidia-smi, the wheelhouse
#   install      gpu_wheels/*.whl into a private folder, each wheel on its own (pip --no-index --no-deps): one
#                that fails leaves the others; the folder goes on PYTHONPATH for every later stage whenever
#                anything was installed; then the import check: what the later stages import (megatron_lime's
#                training step with deepspeed, transformers' GPT-2 for the peer) and nothing else;
#                --dry-run: pip's --dry-run for CPython 3.12, and the import check in this environment
#   gpu          a CUDA GPU is visible: its name and compute capability. Without one the check stops here
#                (exit 3), but with --dry-run, which goes on on the CPU
#   build        setup.py build_ext --inplace, the CUDA extension for this GPU's architecture only (on a CPU dry
#                run: the command is printed and the built CPU extension checked). Skipped under --only when the
#                CUDA extension already imports and no stage that needs it was asked for
#   peer         benchmarks/bench_gpu_peer.py: the plain GPT-2 loop, compile rows first, then eager -> peer.json
#   train        benchmarks/bench_gpu_train.py: ours through training.pretrain.train_step, --deepspeed-config
#                examples/ds_config_zero1_bf16.json, --precisions bf16 autocast, eager and compile, one process
#                per (precision, mode) -> train.json
#   kernels      benchmarks/bench_kernels.py --device cuda (RMSNorm, add + RMSNorm, SiLU in bf16) -> kernels.json
#   tests        tests/test_gpu.py and the CUDA tests of tests/test_kernels.py and tests/test_attention.py (on a CPU
#                dry run: test_gpu.py's CPU tests but the DeepSpeed subprocess one, which the normal suite runs)
#   profile      bench_gpu_train.py's torch.profiler pass of one row as the recipe runs it (bf16, eager): top
#                kernels, GPU idle share, host syncs -> profile.json, profile_ours.md
#   report       gpu_check/gpu_check_report.py: gpu_check.json (ours / peer per row and precision as numbers,
#                "ours_over_peer") and the tables
#
# Output: $OUT (the device tool's return folder) when set, else gpu_check_out/ (git-ignored): gpu_check.json,
# gpu_check.txt (the tables), gpu_check.log (every stage's full output), train.json, peer.json, kernels.json,
# profile.json, profile_ours.md (8 files: the device tool returns at most 8). Exit: 0 all stages passed, 1 some
# failed, 3 no GPU (without --dry-run), 2 bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${LIME_GPU_CHECK_BUDGET_S:-}"
WHEELS="${LIME_GPU_WHEELS:-$REPO/gpu_wheels}"
RESULTS="${OUT:-$REPO/gpu_check_out}"
DRY_RUN="${LIME_GPU_CHECK_DRY_RUN:-0}"
SHAPES="${LIME_GPU_CHECK_SHAPES:-16x4}"
ONLY=""
ALL=0
ALL_STAGES="environment install gpu build peer train kernels tests profile report"
HEADLINE="peer,train"

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --all) ALL=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$ONLY" ] && [ "$ALL" = "1" ]; then echo "gpu_check: --only and --all exclude each other" >&2; exit 2; fi
for stage in ${ONLY//,/ }; do
  case " $ALL_STAGES " in *" $stage "*) ;; *) echo "gpu_check: --only $stage: not a stage of: $ALL_STAGES" >&2; exit 2 ;; esac
done
# What runs: --only's stages; else every stage for --all and --dry-run (which proves every stage's code); else the
# headline call's.
if [ -z "$ONLY" ]; then
  if [ "$ALL" = "1" ] || [ "$DRY_RUN" = "1" ]; then ONLY="build,peer,train,kernels,tests,profile"; else ONLY="$HEADLINE"; fi
fi
LIMIT_SCALE=1
if [ "$DRY_RUN" = "1" ]; then LIMIT_SCALE=4; fi
[ -z "$BUDGET_S" ] && BUDGET_S=$((DRY_RUN == 1 ? 1800 : (ALL == 1 ? 570 : 480)))

mkdir -p "$RESULTS"
WORK="$(mktemp -d /tmp/lime-gpu-check.XXXXXX)"  # stage logs, the installed wheels
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"
LOG="$RESULTS/gpu_check.log"
STATUS="$WORK/stages.tsv"
BUILDING="$WORK/build.running"  # exists while the build runs: the peer times nothing until it is gone
: > "$LOG"
: > "$STATUS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# The kernel choice plan's cache (training.wrap.plan_kernels) lives with this check: the first of our processes
# measures, the others read its choices.
export MEGATRON_LIME_CACHE="$WORK/cache"
START=$SECONDS

say() { echo "[gpu_check $(printf '%3d' $((SECONDS - START)))s] $*"; }

asked() { case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }

wanted() {  # environment, install, gpu and report always run; ONLY picks among the others
  case "$1" in environment|install|gpu|report) return 0 ;; esac
  asked "$1" && return 0
  # A fresh machine has no extension built for this Python: the stages that run ours need it.
  if [ "$1" = build ] && { asked train || asked kernels || asked tests || asked profile; } &&
     ! "$PYTHON" -c "import megatron_lime._kernels_cuda" >/dev/null 2>&1; then return 0; fi
  return 1
}

# run_stage NAME LIMIT_S COMMAND...: the command under timeout (LIMIT_S, cut to what is left of
# the budget), its output appended to the log, one status line, the log's tail when it failed.
run_stage() {
  local name="$1" limit=$(($2 * LIMIT_SCALE))
  shift 2
  if ! wanted "$name"; then
    printf '%s\tskipped\t0\tnot asked for\n' "$name" >> "$STATUS"
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
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.log" 2>&1 < /dev/null
  rc=$?
  { echo "===== stage $name: $* (limit ${limit}s)"; cat "$WORK/$name.log"; } >> "$LOG"
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
  timeout --kill-after=5 60 "$PYTHON" gpu_check/gpu_check_report.py --stages "$STATUS" --work "$WORK" \
    --results "$RESULTS" --dry-run "$DRY_RUN" > "$WORK/report.txt" 2>&1 || cat "$WORK/report.txt"
}

environment() {
  echo "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else echo "nvidia-smi: not found"; fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo "nvcc: not found"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then ls -1 "$WHEELS"; else echo "wheelhouse $WHEELS: none"; fi
}

# What the later stages import, and nothing else: the training step as bench_gpu_train.py runs it (DeepSpeed
# included), transformers' GPT-2 as the peer builds it. Prints where deepspeed came from and every module taken
# from the wheel folder.
IMPORT_CHECK='
import os, sys
import deepspeed
import megatron_lime.training.pretrain, megatron_lime.training.wrap
from transformers import GPT2Config, GPT2LMHeadModel
site = os.environ.get("LIME_GPU_CHECK_SITE") or "-"
print("deepspeed", deepspeed.__version__, "from", deepspeed.__file__)
taken = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                if (getattr(module, "__file__", None) or "").startswith(site + os.sep)})
print("taken from the wheel folder:", ", ".join(taken) or "nothing")
'

install() {
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheelhouse at $WHEELS: run gpu_check/gpu_wheels.sh (with network) and carry gpu_wheels/"
    return 1
  fi
  if [ "$DRY_RUN" = "1" ]; then  # this machine's Python may not be the GPU machine's 3.12
    "$PYTHON" -m pip install --dry-run --no-index --no-deps --ignore-installed --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --target "$SITE" \
      "$WHEELS"/*.whl || return
    echo "import check (dry run: in this environment, the wheels not installed)"
    "$PYTHON" -c "$IMPORT_CHECK"
    return
  fi
  # Each wheel on its own: one that does not install (a broken or foreign wheel) leaves the others, deepspeed
  # above all, on the path. The import check sees the folder as every later stage does, on PYTHONPATH.
  local wheel failed=0
  for wheel in "$WHEELS"/*.whl; do
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
         "$wheel"; then
      echo "installed $(basename "$wheel")"
    else
      echo "gpu_check: $(basename "$wheel") did not install (the others are in place)"
      failed=1
    fi
  done
  LIME_GPU_CHECK_SITE="$SITE" PYTHONPATH="$PYTHONPATH:$SITE" "$PYTHON" -c "$IMPORT_CHECK" || return
  return "$failed"
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
free, total = torch.cuda.mem_get_info()
print(f"{torch.cuda.device_count()} GPU(s); cuda:0 is {torch.cuda.get_device_name(0)}, compute capability "
      f"{major}.{minor}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free)")
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
  "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 150 -rfEs tests/test_gpu.py tests/test_kernels.py \
    tests/test_attention.py -k "cuda"
}

dry_run_flag() { [ "$DRY_RUN" = "1" ] && echo "--dry-run"; }

# A dry run makes our kernel choice plan on the CPU too (it is made for CUDA tensors only), so that path runs and
# its lines print.
plan_on_cpu_in_dry_run() { if [ "$DRY_RUN" = "1" ]; then export LIME_KERNEL_CHOICE_DEVICES=cpu; fi; }

# The benchmarks take their sizes from here (a dry run swaps in tiny ones of its own).
peer() {
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/bench_gpu_peer.py --json "$RESULTS/peer.json" --shapes $SHAPES --modes compile eager \
    --warmup 2 --steps 4 --wait-while "$BUILDING" $(dry_run_flag)
}

train() {
  plan_on_cpu_in_dry_run
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/bench_gpu_train.py --json "$RESULTS/train.json" --shapes $SHAPES --batch-kinds pretrain \
    --precisions bf16 autocast --modes eager compile --warmup 2 --steps 4 --profile-shape none \
    --deepspeed-config examples/ds_config_zero1_bf16.json $(dry_run_flag)
}

profile() {
  plan_on_cpu_in_dry_run
  local shape="${SHAPES%% *}"
  "$PYTHON" benchmarks/bench_gpu_train.py --json "$RESULTS/profile.json" --profile-md "$RESULTS/profile_ours.md" \
    --shapes "$shape" --batch-kinds pretrain --precisions bf16 --modes eager --warmup 2 --steps 1 \
    --profile-shape "$shape" --profile-steps 2 --deepspeed-config examples/ds_config_zero1_bf16.json $(dry_run_flag)
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
export -f environment install gpu build tests dry_run_flag plan_on_cpu_in_dry_run peer train profile kernels
export PYTHON WORK WHEELS DRY_RUN RESULTS SITE SHAPES BUILDING IMPORT_CHECK
say "results in $RESULTS; stages: $ONLY; budget ${BUDGET_S}s$([ "$DRY_RUN" = "1" ] && echo '; dry run: every stage at tiny sizes')"
run_stage environment 60 environment
run_stage install 60 install
# Whatever installed goes on the path, even when one wheel or the import check failed: the later stages then
# fail (or not) on what they really import, and say so.
if [ "$DRY_RUN" != "1" ] && [ -d "$SITE" ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; fi
if ! run_stage gpu 60 gpu; then
  report
  cat "$WORK/report.txt"
  say "no usable CUDA GPU: stopped before the first GPU stage (exit 3); details in $LOG"
  exit 3
fi
report
if wanted build && wanted peer; then
  # The peer needs no extension: it loads and compiles while the build compiles, and times nothing before the
  # build has ended (bench_gpu_peer.py --wait-while), so no row is timed beside the compiler.
  : > "$BUILDING"
  ( run_stage build 240 build; rm -f "$BUILDING" ) &
  building=$!
  run_stage peer 240 peer
  wait "$building"
  rm -f "$BUILDING"
  report
else
  run_stage build 240 build; report
  run_stage peer 200 peer; report
fi
run_stage train 300 train; report
run_stage kernels 150 kernels; report
run_stage tests 150 tests; report
run_stage profile 120 profile; report
cat "$WORK/report.txt"
if awk -F'\t' '$2 == "failed" || $2 == "timeout" {bad = 1} END {exit !bad}' "$STATUS"; then exit 1; fi
exit 0
