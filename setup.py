"""Build and install megatron-lime.

    pip install torch==2.13.0                      # or the torch build matching your CUDA
    pip install --no-build-isolation -e ".[test]"   # builds csrc/ against the torch you have

`--no-build-isolation` matters: an isolated build would download a second torch (a CUDA
build of several GB) just to compile against it, and the extension would then be built
against the wrong torch.

Compiled parts (all from csrc/):
  megatron_lime._kernels_cpu    fused RMSNorm / SiLU for CPU (always built)
  megatron_lime._kernels_cuda   fused RMSNorm / SiLU for CUDA (built when torch has CUDA and nvcc exists)
  megatron_lime._data_helpers   sample / blending index builders, pack_documents for preprocessing (always
                                built; plain pybind11, no libtorch, so it imports without torch)

LIME_BUILD_CUDA=0 skips the CUDA extension, LIME_BUILD_CUDA=1 requires it.
LIME_CUDA_ARCHS="8.0;9.0" (or TORCH_CUDA_ARCH_LIST) picks the GPU architectures (default: 8.0 and 9.0,
A100 and H100); the newest also gets PTX, so newer GPUs JIT-compile it (csrc/kernels/cuda_archs.py).
"""

import glob
import os
import sys

from setuptools import Extension, find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a message for the user, not a code path we test
    sys.exit(
        "megatron-lime compiles C++/CUDA against your installed torch, so install torch first:\n"
        "    pip install torch            (or: pip install torch==2.13.0 for the CPU build)\n"
        "then:\n"
        "    pip install --no-build-isolation -e .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda() -> bool:
    flag = os.environ.get("LIME_BUILD_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not available:
            sys.exit(f"LIME_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}")
        return True
    return available


CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
# AVX2 + FMA is what every x86-64 server of the last decade has; the kernels also have
# scalar tails, so other architectures build without these flags.
if os.uname().machine in ("x86_64", "AMD64"):
    CXX_FLAGS += ["-mavx2", "-mfma", "-mf16c"]

ext_modules = [
    CppExtension(
        "megatron_lime._kernels_cpu",
        sources("csrc/kernels/cpu/*.cpp"),
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    ),
    # Plain pybind11, not linked to libtorch: preprocessing imports it without torch (a second of start-up).
    # pybind11's headers come with torch.
    Extension(
        "megatron_lime._data_helpers",
        sources("csrc/data/*.cpp"),
        include_dirs=[os.path.join(os.path.dirname(torch.__file__), "include")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
        language="c++",
    ),
]

if want_cuda():
    sys.path.insert(0, os.path.join(HERE, "csrc", "kernels"))
    from cuda_archs import gencode_flags, requested_archs  # noqa: E402 - shared with check_cuda_compile.sh

    gencode = gencode_flags(requested_archs())
    ext_modules.append(
        CUDAExtension(
            "megatron_lime._kernels_cuda",
            sources("csrc/kernels/cuda/*.cpp") + sources("csrc/kernels/cuda/*.cu"),
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *gencode]},
        )
    )

ext_modules = [ext for ext in ext_modules if ext.sources]

setup(
    name="megatron-lime",
    version="0.1.0",
    description="Pretrain, instruction-tune and export the LIME-1B language model (DeepSpeed ZeRO-1 + bf16).",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_lime", "megatron_lime.*"]),
    package_data={"megatron_lime": ["**/*.md", "**/*.yaml", "conversion/hf_files/*.py"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "sentencepiece>=0.2",
        "datasets>=2.19",
        "numpy>=1.24",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "pyarrow>=15",
        "xxhash>=3.0",  # checkpoint content hashes (xxh3_128: about 8 GB/s against SHA-256's 1 GB/s)
    ],
    extras_require={
        # flash-attn compiles CUDA at install time: opt in with pip install -e ".[gpu]".
        "gpu": ["flash-attn>=2.5"],
        # wandb: tests/test_wandb.py reads an offline run; lm-eval and matplotlib: the evaluation and report tests;
        # ruff: the linter .ci/run runs (pinned: a new release may add checks); cuobjdump and nvdisasm (6 MB, no
        # GPU needed): tests/test_kernel_cuda_build.py reads the kernels' SASS for 128-bit loads; import-linter:
        # the import layers (.importlinter, tests/test_layers.py), pinned like ruff.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "wandb>=0.19", "lm-eval>=0.4.13,<0.5", "accelerate>=1.0",
                 "matplotlib>=3.8", "ruff==0.17.6", "import-linter==2.17",
                 "nvidia-cuda-cuobjdump>=13; sys_platform == 'linux'",
                 "nvidia-cuda-nvdisasm>=13; sys_platform == 'linux'"],
        # lm-evaluation-harness for tools/evaluate.py and --eval-tasks; matplotlib for tools/report.py.
        "eval": ["lm-eval>=0.4.13,<0.5", "accelerate>=1.0", "matplotlib>=3.8"],
    },
)
