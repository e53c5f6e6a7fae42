#!/usr/bin/env bash
# Compile every CUDA source under csrc/ for sm_80 (A100) and sm_90 (H100) machine code plus
# compute_90 PTX (which the driver JIT-compiles on newer GPUs: B200, RTX 50xx) into /tmp objects,
# with the flags setup.py gives nvcc (csrc/kernels/cuda_archs.py; LIME_CUDA_ARCHS picks others), and prints the
# compiler's register / shared-memory / spill report for each kernel with LIME_PTXAS_VERBOSE=1.
# Runs where torch is a CPU build too (its wheel ships the ATen/cuda and c10/cuda headers), so
# CI without a GPU still proves the kernels compile. Exits non-zero on the first failure.
#
#   csrc/kernels/check_cuda_compile.sh            # uses nvcc from PATH (or $NVCC)
#   LIME_PTXAS_VERBOSE=1 LIME_CUDA_OBJ_DIR=DIR csrc/kernels/check_cuda_compile.sh
#       # + ptxas's report, and keeps the objects in DIR (for cuobjdump -sass: tests/test_kernel_cuda_build.py)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NVCC="${NVCC:-nvcc}"
if [ -n "${LIME_CUDA_OBJ_DIR:-}" ]; then
  OUT_DIR="$LIME_CUDA_OBJ_DIR"
  mkdir -p "$OUT_DIR"
else
  OUT_DIR="$(mktemp -d /tmp/lime-cuda-check.XXXXXX)"
  trap 'rm -rf "$OUT_DIR"' EXIT
fi

command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found (set NVCC or add it to PATH)" >&2; exit 2; }
mapfile -t INCLUDES < <(python -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INCLUDE="$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")"

INCLUDE_FLAGS=(-I"$PY_INCLUDE")
for dir in "${INCLUDES[@]}"; do INCLUDE_FLAGS+=(-I"$dir"); done

# The flags torch's BuildExtension gives nvcc, plus ours from setup.py. A CPU wheel of torch
# lacks the generated c10/cuda/impl/cuda_cmake_macros.h (only export macros for Windows DLLs),
# hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE; a CUDA build of torch has it and needs no define.
mapfile -t GENCODE < <(cd "$REPO/csrc/kernels" && python -c "from cuda_archs import gencode_flags, requested_archs; print('\n'.join(gencode_flags(requested_archs())))")
if [ "${#GENCODE[@]}" -eq 0 ]; then echo "check_cuda_compile: csrc/kernels/cuda_archs.py gave no -gencode flags" >&2; exit 2; fi
NVCC_FLAGS=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -c -std=c++17 -O3 --use_fast_math "${GENCODE[@]}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC
  -DTORCH_EXTENSION_NAME=_kernels_cuda -DTORCH_API_INCLUDE_EXTENSION_H)

mapfile -t SOURCES < <(cd "$REPO" && find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then echo "check_cuda_compile: no .cu files under $REPO/csrc" >&2; exit 2; fi

failed=0
for src in "${SOURCES[@]}"; do
  obj="$OUT_DIR/$(echo "$src" | tr '/' '_').o"
  echo "nvcc ${GENCODE[*]}: $src"
  if ! "$NVCC" "${NVCC_FLAGS[@]}" ${LIME_PTXAS_VERBOSE:+-Xptxas -v} "${INCLUDE_FLAGS[@]}" "$REPO/$src" -o "$obj"; then
    echo "check_cuda_compile: FAILED to compile $src" >&2
    failed=1
  fi
done
# The host-side binding (.cpp in cuda/) must also compile with the CUDA headers in view.
for src in $(cd "$REPO" && find csrc/kernels/cuda -name '*.cpp' | sort); do
  echo "c++ (with CUDA headers): $src"
  if ! "${CXX:-c++}" -c -std=c++17 -O1 -fPIC -I"$(dirname "$(dirname "$(command -v "$NVCC")")")/include" \
      "${INCLUDE_FLAGS[@]}" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_kernels_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
      "$REPO/$src" -o "$OUT_DIR/$(echo "$src" | tr '/' '_').o"; then
    echo "check_cuda_compile: FAILED to compile $src" >&2
    failed=1
  fi
done
if [ "$failed" -ne 0 ]; then exit 1; fi
echo "check_cuda_compile: all CUDA sources compile (sm_80, sm_90 machine code; compute_90 PTX)"
