"""What the CUDA compiler made of the kernels, proven without a GPU: every kernel compiles for sm_80
and sm_90 with zero register spills (ptxas -v), and the RMSNorm and SiLU kernels move their rows
as 128-bit global loads and stores (LDG.E.128 / STG.E.128 in cuobjdump -sass).

One compile (csrc/kernels/check_cuda_compile.sh, the flags setup.py uses) serves every test here;
skipped where nvcc or cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm) is missing.

    python -m pytest -s tests/test_kernel_cuda_build.py   # also prints the README's register / spill table
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90")


def find_tool(name: str) -> str | None:
    """On PATH, in CUDA_HOME/bin, or in the nvidia-cuda-* wheels' bin folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import nvidia  # noqa: PLC0415 - the wheels' namespace package, optional
        candidates += [os.path.join(p, sub, "bin", name) for p in nvidia.__path__ for sub in ("cu13", "cu12", "")]
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


@dataclass(frozen=True)
class KernelReport:
    arch: str
    mangled: str
    registers: int
    spill_stores: int
    spill_loads: int


def parse_ptxas(text: str) -> list[KernelReport]:
    """ptxas -v's lines, per entry function: "Compiling entry function 'NAME' for 'sm_XY'", then
    "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers"."""
    reports, current, spills = [], None, None
    for line in text.splitlines():
        if match := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line):
            current, spills = (match.group(2), match.group(1)), None
        elif current and (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills = (int(match.group(1)), int(match.group(2)))
        elif current and spills and (match := re.search(r"Used (\d+) registers", line)):
            reports.append(KernelReport(current[0], current[1], int(match.group(1)), *spills))
            current = None
    return reports


def demangle(names: list[str]) -> dict[str, str]:
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """'void lime::cuda::(anonymous namespace)::silu_fwd_kernel<c10::BFloat16, 8>(...)' -> 'silu_fwd_kernel<bf16, 8>'
    (the namespaces dropped before the template arguments only: those contain 'c10::' too)."""
    signature = re.sub(r"^void ", "", demangled.replace("(anonymous namespace)", "anonymous"))
    function, _, arguments = re.sub(r"\(.*$", "", signature).partition("<")
    name = function.split("::")[-1] + ("<" + arguments if arguments else "")
    for long, short in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("float", "fp32"), ("double", "fp64")):
        name = name.replace(long, short)
    return name


@dataclass(frozen=True)
class Build:
    reports: list[KernelReport]
    sass: dict[str, str]  # mangled function name -> its SASS, for every arch (concatenated)


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory) -> Build:
    if find_tool("nvcc") is None:
        pytest.skip("nvcc not found")
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None or find_tool("nvdisasm") is None:
        pytest.skip("cuobjdump / nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    objects = tmp_path_factory.mktemp("cuda_objects")
    env = {**os.environ, "LIME_PTXAS_VERBOSE": "1", "LIME_CUDA_OBJ_DIR": str(objects), "LIME_CUDA_ARCHS": "8.0;9.0",
           "PATH": os.pathsep.join([os.path.dirname(cuobjdump), os.environ.get("PATH", "")])}
    done = subprocess.run(["bash", os.path.join(REPO, "csrc", "kernels", "check_cuda_compile.sh")], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sass: dict[str, str] = {}
    for name in sorted(os.listdir(objects)):
        if not name.endswith(".cu.o"):
            continue
        dump = subprocess.run([cuobjdump, "-sass", str(objects / name)], env=env, capture_output=True, text=True,
                              check=True).stdout
        for block in re.split(r"\n\s*Function : ", dump)[1:]:
            function, _, body = block.partition("\n")
            sass[function.strip()] = sass.get(function.strip(), "") + body
    return Build(parse_ptxas(done.stdout + done.stderr), sass)


def test_every_kernel_compiles_for_both_architectures_without_spills(cuda_build):
    kernels = {r.mangled for r in cuda_build.reports}
    assert kernels, "ptxas -v reported no kernels"
    for arch in ARCHS:
        assert {r.mangled for r in cuda_build.reports if r.arch == arch} == kernels, f"kernels missing for {arch}"
    print("\n" + register_table(cuda_build.reports))  # the README's table (pytest -s shows it)
    names = demangle(sorted(kernels))
    spilling = [f"{r.arch} {short_name(names[r.mangled])}: {r.spill_stores} B stores, {r.spill_loads} B loads"
                for r in cuda_build.reports if r.spill_stores or r.spill_loads]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    # The fast paths exist: RMSNorm forward and backward at lime-1b's width, bf16 and fp32.
    short = {short_name(n) for n in names.values()}
    for expected in ("rms_norm_fwd_fast_kernel<bf16, bf16, 1536>", "rms_norm_fwd_fast_kernel<bf16, fp32, 1536>",
                     "rms_norm_bwd_fast_kernel<bf16, bf16, 1536>", "rms_norm_bwd_fast_kernel<fp32, fp32, 1536>",
                     "silu_fwd_kernel<bf16, 8>", "silu_bwd_kernel<bf16, 8>"):
        assert expected in short, (expected, sorted(short))


@pytest.mark.parametrize("kernel", ["rms_norm_fwd_fast_kernel", "rms_norm_bwd_fast_kernel", "silu_fwd_kernel",
                                    "silu_bwd_kernel"])
def test_kernels_move_data_in_128_bit_loads_and_stores(cuda_build, kernel):
    """Every packed instantiation of the kernel (for both architectures) has LDG.E.128 and STG.E.128."""
    names = demangle(sorted(cuda_build.sass))
    packed = [m for m, d in names.items() if short_name(d).startswith(kernel + "<")
              and not short_name(d).endswith(", 1>")]  # silu's scalar fallback (PACK 1) is the exception
    assert packed, f"no {kernel} in the SASS"
    for mangled in packed:
        body = cuda_build.sass[mangled]
        assert re.search(r"\bLDG\.E\.128\b", body), f"{short_name(names[mangled])}: no 128-bit global load"
        assert re.search(r"\bSTG\.E\.128\b", body), f"{short_name(names[mangled])}: no 128-bit global store"


def register_table(reports: list[KernelReport]) -> str:
    """Markdown: kernel, then registers / spill bytes per architecture (the README's table)."""
    names = demangle(sorted({r.mangled for r in reports}))
    rows: dict[str, dict[str, KernelReport]] = {}
    for r in reports:
        rows.setdefault(short_name(names[r.mangled]), {})[r.arch] = r
    lines = ["| kernel | " + " | ".join(f"{a} registers | {a} spills (B)" for a in ARCHS) + " |",
             "|---|" + "---|---|" * len(ARCHS)]
    for name in sorted(rows):
        cells = []
        for arch in ARCHS:
            r = rows[name].get(arch)
            cells += [str(r.registers), str(r.spill_stores + r.spill_loads)] if r else ["-", "-"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
