"""The GPU architectures the CUDA kernels are compiled for, and nvcc's -gencode flags for them.

Used by setup.py and by csrc/kernels/check_cuda_compile.sh, so both compile the same way.

    LIME_CUDA_ARCHS="8.0;9.0"    (or TORCH_CUDA_ARCH_LIST, as torch's own extensions read it)

Each architecture gets its machine code (SASS, `code=sm_XY`), and the newest one also its PTX
(`code=compute_XY`): a GPU newer than every listed architecture (B200 sm_100, RTX 50xx sm_120)
then runs the kernels JIT-compiled by the driver from that PTX instead of failing at the first
launch with "no kernel image is available".
"""

from __future__ import annotations

import os

DEFAULT_ARCHS = ("8.0", "9.0")  # A100, H100 / H200


def requested_archs(environ: dict[str, str] | None = None) -> list[str]:
    """LIME_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the defaults; '+PTX' suffixes are dropped
    (the newest architecture always gets PTX)."""
    environ = os.environ if environ is None else environ
    text = environ.get("LIME_CUDA_ARCHS") or environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(DEFAULT_ARCHS)
    archs = [a.strip().removesuffix("+PTX") for a in text.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    for arch in archs:
        major, _, minor = arch.partition(".")
        if not (major.isdigit() and minor[:1].isdigit()):
            raise ValueError(f"LIME_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST: {arch!r} is not an architecture "
                             "like 9.0 or 9.0a")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """-gencode flags: SASS for every arch, PTX for the newest ('9.0a' -> sm_90a / compute_90a)."""
    def code(arch: str) -> str:
        return arch.replace(".", "")

    def key(arch: str) -> tuple[int, int]:
        major, _, minor = arch.partition(".")
        return int(major), int(minor[:1])

    flags = [f"-gencode=arch=compute_{code(a)},code=sm_{code(a)}" for a in archs]
    newest = max(archs, key=key)
    flags.append(f"-gencode=arch=compute_{code(newest)},code=compute_{code(newest)}")
    return flags
