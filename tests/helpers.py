"""Small, deterministic test data for everyone's tests: a corpus, a tokenizer, a preprocessed dataset.

    corpus = write_tiny_corpus(str(tmp / "corpus.jsonl"))
    tokenizer_dir = train_tiny_tokenizer(str(tmp / "tokenizer"), corpus)
    prefix, tokenizer_dir = make_tiny_pretraining_data(str(tmp))   # all three steps

Everything is idempotent: when the outputs already exist they are reused, so a pytest
session-scoped fixture (tmp_path_factory) pays for them once. The corpus is written by the
package's one corpus writer (megatron_lime.sample_data), the tokenizer by the real
tools/train_tokenizer.py, the preprocessing by megatron_lime.data.preprocess.

Tests import this as `from helpers import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings
from types import ModuleType

from megatron_lime.data import preprocess
from megatron_lime.sample_data import CorpusDocument, write_pretraining_corpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules whose docstrings make the English text (sorted, so the corpus never depends on import order).
DOCSTRING_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip",
    "hashlib", "heapq", "html", "http.client", "inspect", "ipaddress", "itertools", "json", "logging",
    "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile",
)

# Text a lossless tokenizer must survive; spliced into some documents.
HARD_STRINGS = (
    "line one\nline two\n\n\nafter blank lines",
    "tabs\tand\t\tmore tabs\t",
    "runs of spaces:     five, then two  done   ",
    "   leading spaces and a trailing one ",
    "emoji: 😀 👍🏽 🇫🇷 and a family 👨‍👩‍👧",
    "CJK: 中文字符, 日本語のテキスト, 한국어 문장",
    "accents: café naïve résumé, combining e\u0301",
    "a literal \u2581 meta symbol and <eos> <user> <assistant> <pad> written as text",
    "windows line end\r\nand a form feed\f and NUL-free control \x07 char",
    "digits 1234567890 and 3.14159, 2,000,000",
)


def _docstring_paragraphs() -> list[str]:
    paragraphs: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():  # typing.io and friends warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in sorted(DOCSTRING_MODULES):
            module = importlib.import_module(module_name)
            objects = [module] + [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
            for obj in objects:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str) or len(doc) < 80 or doc in seen:
                    continue
                seen.add(doc)
                paragraphs.append(doc.strip())
    return paragraphs


def write_tiny_corpus(path: str, num_docs: int = 200, seed: int = 0) -> str:
    """Write a JSONL in FineWeb-Edu's schema (text, id, dump, url, ...) of English text; returns path.

    Documents are 1 to 6 standard-library docstrings each (a few hundred to a few thousand
    characters); every tenth document also contains one of `HARD_STRINGS`.
    """
    if os.path.isfile(path):
        return path
    rng = random.Random(seed)
    paragraphs = _docstring_paragraphs()
    documents = []
    for i in range(num_docs):
        parts = [paragraphs[rng.randrange(len(paragraphs))] for _ in range(rng.randint(1, 6))]
        if i % 10 == 3:
            parts.insert(rng.randint(0, len(parts)), HARD_STRINGS[(i // 10) % len(HARD_STRINGS)])
        documents.append(CorpusDocument(key=f"{seed}-{i}", text="\n\n".join(parts),
                                        url=f"https://docs.example.org/{seed}/{i}.html",
                                        file_path=f"python-stdlib-docstrings/{seed}/{i}"))
    write_pretraining_corpus(path, max_bytes=sys.maxsize, documents=documents)
    return path


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    module_name = f"lime_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickling (worker processes) look it up by name.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def train_tiny_tokenizer(out_dir: str, corpus: str, vocab_size: int = 512) -> str:
    """Train our tokenizer on `corpus` with tools/train_tokenizer.py (about a second); returns out_dir."""
    if all(os.path.isfile(os.path.join(out_dir, name)) for name in ("tokenizer.model", "tokenizer_info.json")):
        return out_dir
    rc = load_tool("train_tokenizer").main(
        ["--input", corpus, "--output-dir", out_dir, "--vocab-size", str(vocab_size)]
    )
    if rc != 0:
        raise RuntimeError(f"tools/train_tokenizer.py failed (exit {rc}) on {corpus}")
    return out_dir


def make_tiny_pretraining_data(tmp_dir: str, num_docs: int = 200, vocab_size: int = 512) -> tuple[str, str]:
    """Corpus + tokenizer + preprocessing with --append-eod; returns (prefix, tokenizer_dir).

    prefix is `<tmp_dir>/tiny_text_document` (pass it as --data-path).
    """
    corpus = write_tiny_corpus(os.path.join(tmp_dir, "tiny_corpus.jsonl"), num_docs=num_docs)
    tokenizer_dir = train_tiny_tokenizer(os.path.join(tmp_dir, "tokenizer"), corpus, vocab_size=vocab_size)
    output_prefix = os.path.join(tmp_dir, "tiny")
    prefix = output_prefix + "_text_document"
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        rc = preprocess.main([
            "--input", corpus, "--output-prefix", output_prefix, "--tokenizer-model", tokenizer_dir,
            "--append-eod", "--workers", "1", "--quiet",
        ])
        if rc != 0:
            raise RuntimeError(f"preprocessing failed (exit {rc}) on {corpus}")
    return prefix, tokenizer_dir


def build_deepspeed_cpu_op() -> None:
    """Build (about 2 minutes, once per machine) or load (1 s) DeepSpeed's CPU shared-memory all-reduce op.

    DeepSpeed JIT-builds it at the first CPU launch; a run under a file size limit (the disk-full cases)
    would kill the compiler instead of failing where it should, so those cases call this first.
    """
    import subprocess

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def train_tiny(data: tuple[str, str], save, *extra: str) -> subprocess.CompletedProcess:
    """pretrain_lime.py in this process's environment, one rank on the CPU: lime-tiny with one layer, 4 steps,
    a save every 2 into `save` (also --load, so a second call resumes), on `data` = (prefix, tokenizer) as
    make_tiny_pretraining_data returns them; `extra` flags win."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    flags = ["--model", "lime-tiny", "--seq-length", "32", "--num-layers", "1", "--data-path", data[0],
             "--tokenizer-model", data[1], "--save", str(save), "--load", str(save), "--train-iters", "4",
             "--micro-batch-size", "2", "--global-batch-size", "2", "--log-interval", "1", "--eval-interval", "0",
             "--num-workers", "0", "--split", "100,0,0", "--save-interval", "2", *extra]
    return subprocess.run([sys.executable, "pretrain_lime.py", *flags], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def run_with_benchmarks(code: str, *args: str, timeout: int = 300, **env: str) -> dict:
    """Run `code` (with `args` as sys.argv[1:], `env` added to the environment) in a fresh Python with benchmarks/
    on the path, as the benchmarks run (no test imports a benchmark in its own process); it prints one JSON line
    last, which is returned."""
    path = [os.path.join(REPO_ROOT, "benchmarks"), REPO_ROOT] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(path)}, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_corpus_with_tokenizer(root, num_docs: int = 120) -> tuple[str, str, list[dict]]:
    """(corpus.jsonl, tokenizer folder, the corpus's records) under `root`: the preprocessing tests' inputs."""
    corpus = write_tiny_corpus(os.path.join(root, "corpus.jsonl"), num_docs=num_docs)
    tokenizer_dir = train_tiny_tokenizer(os.path.join(root, "tokenizer"), corpus)
    with open(corpus, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return corpus, tokenizer_dir, records


def tiny_sft_dataset(root, tokenizer_dir: str, seq_length: int, *mixture_lines: str) -> str:
    """About 300 dolly-schema examples written under `root` and preprocessed at `seq_length` (plus `mixture_lines`
    in the mixture file, e.g. "over_length: truncate"); returns the dataset's prefix."""
    from megatron_lime.data.sft.preprocess import main as preprocess_sft
    from megatron_lime.sample_data import write_instruction_set

    data = os.path.join(root, "dolly.jsonl")
    write_instruction_set(data, max_examples=300)
    mixture = os.path.join(root, "m.yaml")
    with open(mixture, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in (f"seq_length: {seq_length}", *mixture_lines, "datasets:",
                                                  f"  - {{name: databricks/databricks-dolly-15k, path: {data}}}")))
    assert preprocess_sft(["--mixture", mixture, "--tokenizer", tokenizer_dir,
                           "--output-prefix", os.path.join(root, "dolly"), "--quiet"]) == 0
    return os.path.join(root, "dolly_text_document")
