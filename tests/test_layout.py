"""The tree's rooms keep to their purpose: benchmarks/ holds performance benchmarks only (and their shared helper), no
test imports a benchmark in its own process (a test runs it as a subprocess, as a user does), and pytest collects
nothing from tests/reliability/ (scripts run by hand)."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# The modules a test could import from benchmarks/: every benchmark, bench_common and step_cost among them.
BENCHMARK_MODULES = {name.removesuffix(".py") for name in os.listdir(BENCHMARKS) if name.endswith(".py")}


def names_benchmarks(node: ast.AST, variables: set[str]) -> bool:
    """Whether an expression names the benchmarks folder: a "benchmarks" string in it, or a module-level variable
    that holds one (BENCHMARKS = os.path.join(REPO, "benchmarks"))."""
    return any((isinstance(n, ast.Constant) and isinstance(n.value, str) and "benchmarks" in n.value)
               or (isinstance(n, ast.Name) and n.id in variables) for n in ast.walk(node))


def benchmark_imports(source: str) -> list[str]:
    """The lines of `source` that import from benchmarks/ in-process: `import bench_x` / `from bench_x import`
    (step_cost and bench_common included), and benchmarks/ put on the path (sys.path.insert / append,
    monkeypatch.syspath_prepend) or loaded from it by importlib. Code in strings (a subprocess's) is not code here."""
    tree = ast.parse(source)
    variables = {target.id for statement in tree.body if isinstance(statement, ast.Assign)
                 for target in statement.targets if isinstance(target, ast.Name)
                 and names_benchmarks(statement.value, set())}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            modules = []
        if any(module.split(".")[0] in BENCHMARK_MODULES for module in modules):
            found.append(f"line {node.lineno}: import of {', '.join(modules)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            function = node.func.attr
            on_sys_path = function in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"
            loads = function in ("syspath_prepend", "spec_from_file_location", "import_module")
            arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
            if (on_sys_path or loads) and any(names_benchmarks(argument, variables) for argument in arguments):
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}(... benchmarks ...)")
            elif function == "import_module" and any(isinstance(argument, ast.Constant) and str(argument.value)
                                                     .split(".")[0] in BENCHMARK_MODULES for argument in node.args):
                found.append(f"line {node.lineno}: import_module of a benchmark")
    return found


def test_the_check_finds_every_way_in_and_passes_a_subprocess():
    """The checker itself: each way of importing a benchmark in-process is found; a subprocess's code is not."""
    caught = {
        "import bench_common": 1,
        "import bench_kernels as bk": 1,
        "from step_cost import counting": 1,
        "from bench_common import packed_batch, timed_steps": 1,
        "def f(monkeypatch):\n    monkeypatch.syspath_prepend(os.path.join(REPO, 'benchmarks'))": 1,
        "B = os.path.join(REPO, 'benchmarks')\ndef f(monkeypatch):\n    monkeypatch.syspath_prepend(B)": 1,
        "import sys\nsys.path.insert(0, '/repo/benchmarks')": 1,
        "import importlib\nimportlib.import_module('bench_train')": 1,
        "import importlib.util\nimportlib.util.spec_from_file_location('b', 'benchmarks/bench_train.py')": 1,
    }
    for source, count in caught.items():
        assert len(benchmark_imports(source)) == count, source
    subprocess_code = ("B = os.path.join(REPO, 'benchmarks')\nCODE = 'from bench_common import packed_batch'\n"
                       "env = {'PYTHONPATH': B}\nsubprocess.run([sys.executable, '-c', CODE], env=env)\n"
                       "import bench_marks_elsewhere\nsys.path.insert(0, REPO)")
    assert benchmark_imports(subprocess_code) == []


def test_no_test_imports_a_benchmark():
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            lines = benchmark_imports(handle.read())
        if lines:
            found[os.path.relpath(path, REPO)] = lines
    assert not found, f"run the benchmark as a subprocess (see tests/test_step_cost.py's run_python): {found}"


def test_benchmarks_holds_benchmarks_only():
    """bench_*.py, step_cost.py (the step's cost model) and bench_common.py, their shared helper; the GPU check lives in
    gpu_check/, the fault table and the repeat runner in tests/reliability/."""
    others = sorted(name for name in os.listdir(BENCHMARKS) if name != "__pycache__"
                    and not (name.startswith("bench_") and name.endswith(".py")) and name != "step_cost.py")
    assert others == [], others


def test_pytest_collects_nothing_from_tests_reliability():
    """Its scripts are run by hand (python tests/reliability/fault_injection.py): exit 5 is "no tests collected"."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           os.path.join("tests", "reliability")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stdout[-3000:] + done.stderr[-3000:]
