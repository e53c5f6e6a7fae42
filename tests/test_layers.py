"""The import layers (.importlinter, ARCHITECTURE.md): import-linter checks megatron_lime's whole import graph,
imports inside functions included, and the check fails on an import that runs up a layer or closes a circle.

The failing cases run on a copy of the package with one import added, so they prove the real check can fail.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, ".importlinter")
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")  # import-linter's command (test extra)


def lint_imports(root: str) -> subprocess.CompletedProcess:
    """import-linter over the megatron_lime package found under `root`, with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", CONFIG], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_with_import(tmp_path, module: str, added: str) -> str:
    """A copy of megatron_lime's Python files whose `module` (a path below the package) ends with `added`."""
    root = str(tmp_path)
    shutil.copytree(os.path.join(REPO, "megatron_lime"), os.path.join(root, "megatron_lime"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.json", ".build-stamp"))
    with open(os.path.join(root, "megatron_lime", module), "a", encoding="utf-8") as f:
        f.write("\n\n" + added + "\n")
    return root


def test_the_package_keeps_its_layers():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, added, reported", [
    # the model reaching up into the trainer, hidden inside a function
    ("model/lime.py", "def _leak():\n    from megatron_lime.training import config  # noqa\n",
     "megatron_lime.model is not allowed to import megatron_lime.training"),
    # the ground floor reaching up to the checkpoint package
    ("files.py", "def _leak():\n    import megatron_lime.checkpoint.format  # noqa\n",
     "megatron_lime.files is not allowed to import megatron_lime.checkpoint"),
    # two siblings of one layer (evaluation and conversion may not import each other)
    ("evaluation/tasks.py", "def _leak():\n    from megatron_lime.conversion import generation  # noqa\n",
     "megatron_lime.evaluation is not allowed to import megatron_lime.conversion"),
    # a circle inside one package: checkpoint.format imports checkpoint.weights, which imports format
    ("checkpoint/format.py", "def _circle():\n    from megatron_lime.checkpoint import weights  # noqa\n",
     "No cycles are allowed in megatron_lime.checkpoint"),
], ids=["up-inside-a-function", "ground-floor-up", "siblings", "circle"])
def test_an_import_against_the_layers_fails_the_check(tmp_path, module, added, reported):
    done = lint_imports(copy_with_import(tmp_path, module, added))
    assert done.returncode != 0
    assert reported in " ".join(done.stdout.split()), done.stdout[-3000:]
