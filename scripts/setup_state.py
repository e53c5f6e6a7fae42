"""What scripts/setup.sh still has to install, answered in a fraction of a second (no torch import).

    python scripts/setup_state.py                # prints ready | old-python | no-torch | no-package | not-built | stale
    python scripts/setup_state.py --write-stamp  # after an install: remember what was built

The stamp (megatron_lime/.build-stamp) is a hash of what the compiled parts are built from:
setup.py, every file under csrc/, the torch version and the environment. A stamp that no longer
matches means a rebuild; no stamp at all means someone installed by hand, which is trusted.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "megatron_lime")
STAMP = os.path.join(PACKAGE, ".build-stamp")
EXTENSIONS = ("_kernels_cpu", "_data_helpers")


def build_hash() -> str:
    digest = hashlib.sha256()
    # Sources only: importing csrc/kernels/cuda_archs.py (check_cuda_compile.sh does) writes a
    # __pycache__ that must not count as a change.
    sources = ["setup.py"] + sorted(os.path.relpath(os.path.join(folder, name), REPO)
                                    for folder, _, names in os.walk(os.path.join(REPO, "csrc"))
                                    if "__pycache__" not in folder for name in names
                                    if not name.endswith((".pyc", ".o")))
    for path in sources:
        digest.update(path.encode())
        with open(os.path.join(REPO, path), "rb") as f:
            digest.update(f.read())
    digest.update(importlib.metadata.version("torch").encode())
    digest.update(sys.prefix.encode())
    return digest.hexdigest()


def state() -> str:
    if sys.version_info < (3, 10):
        return "old-python"
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "no-torch"
    spec = importlib.util.find_spec("megatron_lime")
    if spec is None or os.path.dirname(os.path.realpath(spec.origin)) != os.path.realpath(PACKAGE):
        return "no-package"
    names = os.listdir(PACKAGE)
    if not all(any(n.startswith(ext + ".") and n.endswith((".so", ".pyd")) for n in names) for ext in EXTENSIONS):
        return "not-built"
    if os.path.isfile(STAMP):
        with open(STAMP, encoding="utf-8") as f:
            if f.read().strip() != build_hash():
                return "stale"
    return "ready"


if __name__ == "__main__":
    if "--write-stamp" in sys.argv[1:]:
        with open(STAMP, "w", encoding="utf-8") as f:
            f.write(build_hash() + "\n")
    else:
        print(state())
