#!/usr/bin/env bash
# Build the wheelhouse that gpu_check/gpu_check.sh installs from on a GPU machine without network.
#
#   bash gpu_check/gpu_wheels.sh              # -> gpu_wheels/ (git-ignored), prints its size
#   bash gpu_check/gpu_wheels.sh DIR          # somewhere else
#
# What the GPU machine lacks of what the check's stages import: the training step (bench_gpu_train.py:
# megatron_lime.training with DeepSpeed), the peer (bench_gpu_peer.py: transformers' GPT-2), the kernels' benchmark
# and the GPU tests. Found by recording every distribution in sys.modules at the end of each benchmark's dry run
# (2026-12-07) and comparing with the GPU image's package list (the device tool's KINDS.md: it has torch,
# transformers, numpy, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm, packaging, pyyaml, safetensors,
# sentencepiece, tokenizers, xxhash, pyarrow, tensorboard, pytest, pytest-timeout, typing-extensions, ...): only
# deepspeed and its own needs hjson and pydantic (with pydantic-core, annotated-types, typing-inspection, and a
# typing-extensions new enough for that pydantic). Training imports neither `datasets` (only the Hugging Face
# readers of preprocessing and evaluation do) nor dill (torch.utils.data tries it and goes on without), so neither
# is carried. Versions are those of the Python environment running this script (the ones the test suite passed
# with); PYTHON picks another interpreter. gpu_check.sh installs each wheel on its own, so one that fails to
# install leaves the others (deepspeed above all) in place.
#
# deepspeed is built here from its source distribution as a pure-Python wheel with no compiled ops
# (DS_BUILD_OPS=0): DeepSpeed JIT-compiles an op on first use, and megatron-lime's training uses
# none (the optimizer is torch's AdamW). The compiled dependencies are downloaded as CPython 3.12
# manylinux x86-64 wheels (the GPU machine's Python), the pure ones as py3-none-any wheels.
# Written to DIR.partial and renamed at the end: a DIR that exists is complete.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$REPO/gpu_wheels}"
PYTHON="${PYTHON:-python}"
TARGET_PYTHON=3.12
MAX_MB=50
PARTIAL="$OUT_DIR.partial"

version_of() {
  "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || {
    echo "gpu_wheels: $1 is not installed in $PYTHON's environment: install it (pip install -e '.[test]') or pin it here" >&2
    exit 2
  }
}

DOWNLOADED=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)

rm -rf "$PARTIAL"
mkdir -p "$PARTIAL"

deepspeed_version="$(version_of deepspeed)"
echo "gpu_wheels: building deepspeed==$deepspeed_version as a pure-Python wheel (DS_BUILD_OPS=0) ..."
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
  "deepspeed==$deepspeed_version" -w "$PARTIAL"
ls "$PARTIAL"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1 || {
  echo "gpu_wheels: the deepspeed wheel is not py3-none-any: $(ls "$PARTIAL")" >&2
  exit 1
}

specs=()
for name in "${DOWNLOADED[@]}"; do specs+=("$name==$(version_of "$name")"); done
echo "gpu_wheels: downloading ${specs[*]} for CPython $TARGET_PYTHON manylinux x86-64 ..."
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$PARTIAL" "${specs[@]}"

count="$(ls "$PARTIAL"/*.whl | wc -l)"
if [ "$count" -ne $((${#DOWNLOADED[@]} + 1)) ]; then
  echo "gpu_wheels: expected $((${#DOWNLOADED[@]} + 1)) wheels, got $count: $(ls "$PARTIAL")" >&2
  exit 1
fi
size_kb="$(du -sk "$PARTIAL" | cut -f1)"
if [ "$size_kb" -gt $((MAX_MB * 1024)) ]; then
  echo "gpu_wheels: $((size_kb / 1024)) MB is over the $MAX_MB MB budget (the device call carries at most 64 MiB)" >&2
  exit 1
fi
rm -rf "$OUT_DIR"
mv "$PARTIAL" "$OUT_DIR"
ls -1 "$OUT_DIR"
echo "gpu_wheels: $count wheels, $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
