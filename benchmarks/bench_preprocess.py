#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py end to end, and the sample index for a 20B-token corpus.

    python benchmarks/bench_preprocess.py --workdir /tmp/lime-bench [--workers 1 2] [--mb 50]
    # both tokenizers side by side, with Megatron-LM's tool (a checkout of it; Python 3.11 runs core_v0.15.0):
    python benchmarks/bench_preprocess.py --workdir /tmp/lime-bench --workers 2 --rounds 3 --skip-parquet \
        --skip-index --standard-sentencepiece --megatron-lm /path/to/Megatron-LM

1. Generates a ~50 MB JSONL (FineWeb-Edu schema) of English text: docstrings of every
   importable standard-library module, class, function and method (plus numpy, torch,
   pyarrow, datasets: the standard library alone has too little distinct text for a 32k
   vocabulary), 1-6 per document.
2. Trains a 32k-entry LIME tokenizer (tools/train_tokenizer.py code) on part of it.
3. The ceiling: sentencepiece alone, one process encoding already-parsed texts.
4. Runs `python tools/preprocess_data.py --append-eod --workers N` as a subprocess for each
   N: wall time from process start to the files being complete; documents/s, tokens/s, MB/s;
   peak RSS of the main process and of a worker. Each run alternates with a sentencepiece-alone
   run (--rounds of each), so a load change on a shared machine hits both: the figure to read
   is the ratio end-to-end / (N x sentencepiece alone), median over the rounds. On a shared
   machine two more figures hold up better: end to end against N sentencepiece processes run
   at once (they get the same share of the cores), and tokens per CPU-second against
   sentencepiece alone (the overhead, whatever the load). Also at half the input size, to
   show memory does not grow with the input.
5. Parquet: the same rows as one parquet file and as 4 files of a quarter each (row groups of
   1,000 rows, as `datasets` writes them), --parquet-workers workers, runs alternated: reading
   several files at once must not be slower than one file.
6. Start-up: the same command on a one-document input.
7. --standard-sentencepiece: a standard 32k sentencepiece BPE model (sentencepiece's defaults: nmt_nfkc,
   dummy prefix, whitespace escaping and collapsing; plus byte fallback) trained on the same corpus.
   First the start-up on a one-document input, with the model's converted form computed (an empty
   tokenizer cache) and read from the cache (tokenizer/conversion_cache.py; the benchmark keeps its
   cache in --workdir). Per round, alternated: sentencepiece alone (the ceiling), the tool's encoder
   (sentencepiece where it provably agrees with the Hugging Face conversion, the conversion elsewhere:
   tokenizer/agreement.py), the conversion alone, the tool end to end, and with --megatron-lm DIR Megatron-LM's
   tools/preprocess_data.py (GPTSentencePieceTokenizer, --append-eod, same workers), whose .bin/.idx
   must be byte-identical to ours.
8. Sample index for a simulated 20B-token corpus: 20M documents with log-normal lengths
   (mean ~1,000 tokens), a sparse .bin and a real .idx, GPTDataset's document shuffle +
   C++ build_sample_idx + sample shuffle for one epoch at seq_length 512, then the cached reload.

Prints a table and writes results.json in --workdir. Nothing is assumed: every figure is measured.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings

from bench_common import Stopwatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Installed libraries with long English docstrings, to give a 32k vocabulary enough distinct text.
EXTRA_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "torch", "torch.nn",
                 "torch.nn.functional",
                 "torch.linalg", "torch.fft", "torch.special", "torch.distributed", "torch.optim", "torch.utils.data",
                 "pyarrow", "pyarrow.compute", "pyarrow.parquet", "datasets", "tqdm", "yaml")
SKIP_MODULES = {"antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter", "lib2to3", "pydoc_data",
                "ensurepip", "venv", "__main__", "xxsubtype", "_tkinter"}


def stdlib_module_names() -> list[str]:
    """Top-level standard-library modules and the submodules of its packages (no tests, no GUIs)."""
    import pkgutil

    names = []
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP_MODULES or name.startswith("_"):
            continue
        names.append(name)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=name + "."):
                if "test" not in info.name and "._" not in info.name and "__main__" not in info.name:
                    names.append(info.name)
    return names


def stdlib_docstrings() -> list[str]:
    """Every docstring of 80+ characters of the standard library (and EXTRA_MODULES): modules, classes, functions,
    methods."""
    docs: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in stdlib_module_names() + list(EXTRA_MODULES):
            try:
                module = importlib.import_module(name)
            except BaseException:  # platform-specific modules (winreg, msvcrt, ...)
                continue
            stack = [module] + [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in stack:
                candidates = [obj]
                if isinstance(obj, type):
                    candidates += [getattr(obj, a, None) for a in sorted(vars(obj)) if not a.startswith("__")]
                for c in candidates:
                    doc = getattr(c, "__doc__", None)
                    if isinstance(doc, str) and len(doc) >= 80:
                        docs[doc.strip()] = None
    return list(docs)


def write_corpus(path: str, target_bytes: int, paragraphs: list[str], seed: int = 0) -> dict:
    if os.path.isfile(path):
        return {"path": path, "bytes": os.path.getsize(path)}
    rng = random.Random(seed)
    tmp = path + ".tmp"
    written = docs = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target_bytes:
            text = "\n\n".join(paragraphs[rng.randrange(len(paragraphs))] for _ in range(rng.randint(1, 6)))
            record = {"text": text, "id": f"<urn:uuid:{docs:08d}>", "dump": "CC-MAIN-2025-05",
                      "url": f"https://docs.python.org/{docs}", "file_path": "bench", "language": "en",
                      "language_score": 0.95, "token_count": len(text.split()), "score": 3.1, "int_score": 3}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    os.replace(tmp, path)
    return {"path": path, "bytes": written}


def run_preprocess(corpus: str, tokenizer: str, prefix: str, workers: int, env: dict | None = None) -> dict:
    """Wall time and peak memory of one preprocess_data.py process tree (env: variables to set for it)."""
    for ext in (".bin", ".idx"):
        if os.path.exists(prefix + "_text_document" + ext):
            os.remove(prefix + "_text_document" + ext)
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-model", tokenizer, "--append-eod",
           "--workers", str(workers), "--quiet"]
    # /usr/bin/time is not always there: measure the children's peak RSS with a wrapper process.
    wrapper = ("import resource, subprocess, sys, json; "
               "p = subprocess.run(sys.argv[1:]); "
               "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(json.dumps({'rc': p.returncode, 'maxrss_kb': u.ru_maxrss, "
               "'cpu_s': u.ru_utime + u.ru_stime}), file=sys.stderr)")
    with Stopwatch() as watch:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
    wall = watch.seconds
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_data.py failed:\n{proc.stdout}\n{proc.stderr}")
    memory = json.loads(proc.stderr.strip().splitlines()[-1])
    if memory["rc"] != 0:
        raise RuntimeError(f"preprocess_data.py exited {memory['rc']}:\n{proc.stdout}\n{proc.stderr}")
    from megatron_lime.data.indexed_dataset import IndexedDataset
    from megatron_lime.data.shards import input_size

    ds = IndexedDataset(prefix + "_text_document")
    input_mb = input_size(corpus) / 1e6
    return {"workers": workers, "wall_s": wall, "load_average_1min_after": os.getloadavg()[0], "documents": len(ds),
            "tokens": ds.num_tokens,
            "input_mb": input_mb, "docs_per_s": len(ds) / wall, "tokens_per_s": ds.num_tokens / wall,
            "mb_per_s": input_mb / wall, "peak_rss_mb": memory["maxrss_kb"] / 1024,
            "cpu_s": memory["cpu_s"], "tokens_per_cpu_s": ds.num_tokens / memory["cpu_s"],
            "summary": proc.stdout.strip().splitlines()[-1]}


def read_texts(corpus: str, max_bytes: int) -> list[str]:
    """The "text" values of the corpus's first `max_bytes` of JSONL, parsed before any timing starts."""
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= max_bytes:
                break
    return texts


def bench_sentencepiece_alone(corpus: str, tokenizer: str, max_bytes: int = 20_000_000, encoder: str = "sentencepiece",
                              ) -> dict:
    """The ceiling: one process encoding already-parsed texts with sentencepiece itself, nothing else.

    encoder="tool": the tokenizer's own encode_batch instead (for a standard sentencepiece model: sentencepiece
    where it provably agrees with the Hugging Face conversion, the conversion elsewhere); "conversion": the
    tokenizers-library conversion alone (what every text went through before).
    """
    from megatron_lime.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    texts = read_texts(corpus, max_bytes)
    encode = {"sentencepiece": lambda batch: tok.processor.encode(batch, num_threads=1),
              "tool": tok.encode_batch,
              "conversion": lambda batch: [e.ids for e in tok.backend.encode_batch(batch, add_special_tokens=False)],
              }[encoder]
    with Stopwatch() as wall, Stopwatch(clock="cpu") as cpu:
        tokens = sum(len(ids) for ids in encode(texts))
    seconds, cpu_s = wall.seconds, cpu.seconds
    return {"documents": len(texts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_s}


def bench_sentencepiece_parallel(corpus: str, tokenizer: str, processes: int, max_bytes: int = 20_000_000) -> dict:
    """The ceiling on a busy machine: `processes` forked processes encode the parsed texts at once.

    On an idle machine this is processes x sentencepiece alone; when other work shares the
    cores, it gets the same share of them as the end-to-end run alternating with it does.
    """
    import multiprocessing

    from megatron_lime.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    texts = read_texts(corpus, max_bytes)
    share = [texts[k::processes] for k in range(processes)]

    def encode(k: int, queue) -> None:
        queue.put(sum(len(ids) for ids in tok.processor.encode(share[k], num_threads=1)))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with Stopwatch() as watch:
        children = [context.Process(target=encode, args=(k, queue)) for k in range(processes)]
        for child in children:
            child.start()
        tokens = sum(queue.get() for _ in children)
        for child in children:
            child.join()
    seconds = watch.seconds
    return {"processes": processes, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_against_ceiling(corpus: str, tokenizer: str, prefix: str, workers: int, rounds: int) -> dict:
    """End to end at `workers` against workers x sentencepiece alone, alternated round by round."""
    rows = []
    for _ in range(rounds):
        alone = bench_sentencepiece_alone(corpus, tokenizer)
        parallel = bench_sentencepiece_parallel(corpus, tokenizer, workers)
        run = run_preprocess(corpus, tokenizer, prefix, workers)
        rows.append({"alone_tokens_per_s": alone["tokens_per_s"],
                     "parallel_alone_tokens_per_s": parallel["tokens_per_s"],
                     "end_to_end": run, "ratio": run["tokens_per_s"] / (workers * alone["tokens_per_s"]),
                     "ratio_to_parallel": run["tokens_per_s"] / parallel["tokens_per_s"],
                     "cpu_efficiency": run["tokens_per_cpu_s"] / alone["tokens_per_cpu_s"]})

    def median(key: str) -> float:
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]
    best = max((r["end_to_end"] for r in rows), key=lambda r: r["tokens_per_s"])
    return {"workers": workers, "rounds": rows, "median_ratio": median("ratio"),
            "median_ratio_to_parallel": median("ratio_to_parallel"),
            "median_cpu_efficiency": median("cpu_efficiency"), "best": best}


def train_standard_sentencepiece(corpus: str, model_file: str, vocab_size: int, num_documents: int = 20_000) -> str:
    """A standard sentencepiece BPE model, as LLaMA-style models have them: sentencepiece's defaults (nmt_nfkc
    normalisation, dummy prefix, whitespace escaping and collapsing) plus byte fallback. Megatron-LM reads it."""
    import sentencepiece as spm

    if os.path.isfile(model_file):
        return model_file
    texts = read_texts(corpus, 1 << 62)[:num_documents]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=model_file.removesuffix(".model"),
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=True, num_threads=2,
                                   minloglevel=2)
    return model_file


def run_megatron_lm(megatron_lm: str, corpus: str, model_file: str, prefix: str, workers: int) -> dict:
    """Megatron-LM's tools/preprocess_data.py on the same input and model (GPTSentencePieceTokenizer, --append-eod)."""
    for ext in (".bin", ".idx"):
        if os.path.exists(prefix + "_text_document" + ext):
            os.remove(prefix + "_text_document" + ext)
    cmd = [sys.executable, os.path.join(megatron_lm, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model_file,
           "--append-eod", "--workers", str(workers), "--log-interval", "1000000"]
    with Stopwatch() as watch:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=megatron_lm,
                              env={**os.environ, "PYTHONPATH": megatron_lm})
    wall = watch.seconds
    if proc.returncode != 0:
        raise RuntimeError(f"Megatron-LM's preprocess_data.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, "load_average_1min_after": os.getloadavg()[0]}


def same_bytes(a: str, b: str) -> bool:
    import filecmp

    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


def bench_standard_sentencepiece(corpus: str, model_file: str, workdir: str, workers: int, rounds: int,
                                 megatron_lm: str | None, tiny_corpus: str) -> dict:
    """A standard sentencepiece model: the start-up with the converted form computed (cold cache) and read from
    the cache, which texts sentencepiece encodes, the encoders alone, end to end against workers x sentencepiece
    alone, and (with Megatron-LM) Megatron-LM's tool side by side, runs alternated."""
    import tempfile

    from megatron_lime.tokenizer import load_tokenizer

    startup: dict = {"cold": [], "warm": []}
    for _ in range(3):
        with tempfile.TemporaryDirectory(dir=workdir) as cold_cache:
            startup["cold"].append(run_preprocess(tiny_corpus, model_file, os.path.join(workdir, "std_tiny"), workers,
                                                  env={"MEGATRON_LIME_CACHE": cold_cache})["wall_s"])
            startup["warm"].append(run_preprocess(tiny_corpus, model_file, os.path.join(workdir, "std_tiny"), workers,
                                                  env={"MEGATRON_LIME_CACHE": cold_cache})["wall_s"])

    tok = load_tokenizer(model_file)
    texts = read_texts(corpus, 20_000_000)
    covered = sum(map(tok.agreement.covers, texts))
    result: dict = {"agreement": tok.describe_encoder(), "documents_sampled": len(texts),
                    "documents_by_sentencepiece": covered, "startup_one_document_s": startup, "rounds": []}
    ours_prefix, megatron_prefix = os.path.join(workdir, "std_ours"), os.path.join(workdir, "std_megatron")
    for _ in range(rounds):
        row = {encoder: bench_sentencepiece_alone(corpus, model_file, encoder=encoder)["tokens_per_s"]
               for encoder in ("sentencepiece", "tool", "conversion")}
        ours = run_preprocess(corpus, model_file, ours_prefix, workers)
        row["end_to_end"] = ours
        row["ratio"] = ours["tokens_per_s"] / (workers * row["sentencepiece"])
        if megatron_lm:
            megatron = run_megatron_lm(megatron_lm, corpus, model_file, megatron_prefix, workers)
            row["megatron_lm"] = megatron
            row["speedup_over_megatron_lm"] = megatron["wall_s"] / ours["wall_s"]
            row["identical_to_megatron_lm"] = same_bytes(ours_prefix + "_text_document",
                                                         megatron_prefix + "_text_document")
        result["rounds"].append(row)
    return result


def print_standard(result: dict, workers: int) -> None:
    rounds = result["rounds"]

    def spread(values: list[float], fmt: str) -> str:
        values = sorted(values)
        return f"{format(values[len(values) // 2], fmt)} (median; {format(values[0], fmt)}-{format(values[-1], fmt)})"

    print(result["agreement"])
    startup = result["startup_one_document_s"]
    print(f"  start-up (one document, end to end): {min(startup['cold']):.2f} s computing the converted form "
          f"(cold cache), {min(startup['warm']):.2f} s reading it from the cache (best of {len(startup['cold'])})")
    print(f"  documents sentencepiece encodes: {result['documents_by_sentencepiece']:,} of "
          f"{result['documents_sampled']:,} ({result['documents_by_sentencepiece'] / result['documents_sampled']:.1%})")
    for encoder, label in (("sentencepiece", "sentencepiece alone (the ceiling)"),
                           ("tool", "the tool's encoder (sentencepiece + conversion)"),
                           ("conversion", "the Hugging Face conversion alone (before)")):
        print(f"  {label}: {spread([r[encoder] for r in rounds], ',.0f')} tokens/s, one process")
    print(f"  preprocess_data.py, {workers} workers: {spread([r['end_to_end']['wall_s'] for r in rounds], '.2f')} s, "
          f"end to end / ({workers} x sentencepiece alone) = {spread([r['ratio'] for r in rounds], '.1%')}")
    if "megatron_lm" in rounds[0]:
        print(f"  Megatron-LM's preprocess_data.py, {workers} workers: "
              f"{spread([r['megatron_lm']['wall_s'] for r in rounds], '.2f')} s; ours is "
              f"{spread([r['speedup_over_megatron_lm'] for r in rounds], '.2f')}x faster; .bin/.idx byte-identical in "
              f"{sum(r['identical_to_megatron_lm'] for r in rounds)} of {len(rounds)} rounds")
    print("  load average (1 min) after each run: "
          + ", ".join(f"{r['end_to_end']['load_average_1min_after']:.1f}" for r in rounds))


def write_parquet_copies(corpus: str, workdir: str, parts: int = 4, row_group_rows: int = 1000) -> tuple[str, str]:
    """The JSONL's rows as one parquet file and as `parts` files of consecutive quarters (same total)."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    one = os.path.join(workdir, "parquet_one", "all.parquet")
    several = os.path.join(workdir, f"parquet_{parts}")
    if os.path.isfile(one) and os.path.isdir(several):
        return one, several
    table = pj.read_json(corpus, read_options=pj.ReadOptions(block_size=64 << 20))
    os.makedirs(os.path.dirname(one), exist_ok=True)
    os.makedirs(several, exist_ok=True)
    pq.write_table(table, one, row_group_size=row_group_rows)
    for k in range(parts):
        start, stop = table.num_rows * k // parts, table.num_rows * (k + 1) // parts
        pq.write_table(table.slice(start, stop - start), os.path.join(several, f"part-{k:05d}.parquet"),
                       row_group_size=row_group_rows)
    return one, several


def bench_parquet_files(corpus: str, tokenizer: str, workdir: str, workers: int, rounds: int) -> dict:
    """Tokens/s for 4 parquet files against one file of the same rows, runs alternated."""
    one, several = write_parquet_copies(corpus, workdir)
    one_runs, several_runs = [], []
    for _ in range(rounds):
        one_runs.append(run_preprocess(one, tokenizer, os.path.join(workdir, "pq_one"), workers))
        several_runs.append(run_preprocess(several, tokenizer, os.path.join(workdir, "pq_four"), workers))
    best_one = max(one_runs, key=lambda r: r["tokens_per_s"])
    best_several = max(several_runs, key=lambda r: r["tokens_per_s"])
    ratios = sorted(b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(one_runs, several_runs))
    return {"workers": workers, "one_file": best_one, "four_files": best_several,
            "one_file_tokens_per_s": [r["tokens_per_s"] for r in one_runs],
            "four_files_tokens_per_s": [r["tokens_per_s"] for r in several_runs],
            "median_ratio_four_over_one": ratios[len(ratios) // 2]}


def bench_sample_index(workdir: str, num_documents: int, seq_length: int) -> dict:
    import numpy as np

    from megatron_lime.data.gpt_dataset import GPTDataset
    from megatron_lime.data.indexed_dataset import IndexedDataset, dataset_paths, write_index

    prefix = os.path.join(workdir, "sim20b_text_document")
    bin_path, idx_path = dataset_paths(prefix)
    rng = np.random.default_rng(0)
    # Log-normal lengths: median ~600, mean ~1,000 tokens, like FineWeb-Edu documents.
    lengths = np.clip(rng.lognormal(mean=np.log(600), sigma=1.0, size=num_documents), 16, 100_000).astype(np.int32)
    write_index(idx_path, np.uint16, lengths)
    with open(bin_path, "wb") as f:  # sparse: no disk space used, reads give zeros
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    ds = IndexedDataset(prefix)
    tokens = ds.num_tokens
    num_samples = (tokens - 1) // seq_length  # one full epoch
    cache = os.path.join(workdir, "sim20b-cache")
    if os.path.isdir(cache):
        for name in os.listdir(cache):
            os.remove(os.path.join(cache, name))
    with Stopwatch() as build:
        built = GPTDataset(ds, (0, num_documents), seq_length, num_samples, seed=1234, cache_dir=cache)
    with Stopwatch() as load:
        loaded = GPTDataset(IndexedDataset(prefix), (0, num_documents), seq_length, num_samples, seed=1234,
                            cache_dir=cache)
    assert len(loaded) == len(built) and loaded[len(loaded) - 1]["input_ids"].shape == (seq_length,)
    from megatron_lime.data.gpt_dataset import build_sample_index

    with Stopwatch() as cpp:
        build_sample_index(lengths, built.document_index, seq_length, num_samples)
    build_s, load_s, cpp_s = build.seconds, load.seconds, cpp.seconds
    return {"documents": num_documents, "tokens": tokens, "seq_length": seq_length, "samples": len(built),
            "build_and_cache_s": build_s, "build_sample_idx_cpp_only_s": cpp_s, "cached_reload_s": load_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/lime-bench")
    parser.add_argument("--mb", type=float, default=50.0, help="Size of the generated JSONL in MB.")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3,
                        help="Alternated rounds (sentencepiece alone, then end to end) per setting; medians and bests "
                             "are reported.")
    parser.add_argument("--parquet-workers", type=int, default=2,
                        help="Workers for the 4-files-against-one parquet comparison.")
    parser.add_argument("--skip-parquet", action="store_true")
    parser.add_argument("--index-documents", type=int, default=20_000_000)
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--standard-sentencepiece", action="store_true",
                        help="Also a standard sentencepiece BPE model (defaults + byte fallback, --vocab-size), "
                             "Megatron-LM-readable; only it with --only-standard.")
    parser.add_argument("--only-standard", action="store_true", help="Only the standard sentencepiece case.")
    parser.add_argument("--megatron-lm", default=None, metavar="DIR",
                        help="A Megatron-LM checkout: its tools/preprocess_data.py runs beside ours on the standard "
                             "model (alternated rounds), and the .bin/.idx are compared byte for byte.")
    args = parser.parse_args()
    args.standard_sentencepiece = args.standard_sentencepiece or args.only_standard
    os.makedirs(args.workdir, exist_ok=True)
    # The tokenizer cache (tokenizer/conversion_cache.py) of this benchmark's own, not the user's.
    os.environ["MEGATRON_LIME_CACHE"] = os.path.join(args.workdir, "tokenizer-cache")

    results: dict = {"machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    paragraphs = stdlib_docstrings()
    corpus = write_corpus(os.path.join(args.workdir, f"corpus_{args.mb:g}mb.jsonl"), int(args.mb * 1e6), paragraphs)
    half = write_corpus(os.path.join(args.workdir, f"corpus_{args.mb / 2:g}mb.jsonl"), int(args.mb * 5e5), paragraphs,
                        seed=1)
    tiny = write_corpus(os.path.join(args.workdir, "corpus_one_doc.jsonl"), 1, paragraphs)
    results["corpus"] = {"paragraphs": len(paragraphs), **corpus}
    tokenizer = os.path.join(args.workdir, f"tokenizer_{args.vocab_size}")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer_info.json")):
        with Stopwatch() as watch:
            rc = subprocess.call([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"),
                                  "--input", corpus["path"],
                                  "--output-dir", tokenizer, "--vocab-size", str(args.vocab_size),
                                  "--num-documents", "20000", "--num-threads", "2"])
        if rc != 0:
            return rc
        results["tokenizer_train_s"] = watch.seconds

    if args.standard_sentencepiece:
        model_file = os.path.join(args.workdir, f"standard_bpe_{args.vocab_size}.model")
        train_standard_sentencepiece(corpus["path"], model_file, args.vocab_size)
        workers = max(args.workers)
        standard = bench_standard_sentencepiece(corpus["path"], model_file, args.workdir, workers, args.rounds,
                                                args.megatron_lm, tiny["path"])
        results["standard_sentencepiece"] = standard
        print(f"standard sentencepiece BPE ({args.vocab_size:,} pieces, byte fallback, nmt_nfkc), "
              f"{corpus['bytes'] / 1e6:.1f} MB JSONL:", flush=True)
        print_standard(standard, workers)
        if args.only_standard:
            from megatron_lime.files import write_json

            write_json(os.path.join(args.workdir, "results.json"), results)
            return 0

    runs = []
    for workers in args.workers:
        measured = bench_against_ceiling(corpus["path"], tokenizer, os.path.join(args.workdir, "out"), workers,
                                         args.rounds)
        results[f"against_ceiling_{workers}_workers"] = measured
        best = measured["best"]
        runs.append(best)
        alone = [r["alone_tokens_per_s"] for r in measured["rounds"]]
        print(f"{workers} worker(s): {best['wall_s']:.2f} s, {best['docs_per_s']:,.0f} docs/s, "
              f"{best['tokens_per_s']:,.0f} tokens/s, {best['mb_per_s']:.1f} MB/s, "
              f"largest process RSS {best['peak_rss_mb']:.0f} MB "
              f"(load average {best['load_average_1min_after']:.1f} on {os.cpu_count()} CPUs)", flush=True)
        print(f"  against its ceiling: end to end / ({workers} x sentencepiece alone) = "
              + ", ".join(f"{r['ratio']:.1%}" for r in measured["rounds"])
              + f" in {args.rounds} alternated rounds, median {measured['median_ratio']:.1%} "
              f"(sentencepiece alone {min(alone):,.0f}-{max(alone):,.0f} tokens/s)", flush=True)
        print(f"  end to end / {workers} sentencepiece processes at once (the same machine share) = "
              + ", ".join(f"{r['ratio_to_parallel']:.1%}" for r in measured["rounds"])
              + f", median {measured['median_ratio_to_parallel']:.1%}; tokens per CPU-second against sentencepiece "
              f"alone: median {measured['median_cpu_efficiency']:.1%}", flush=True)
    results["preprocess"] = runs
    half_run = run_preprocess(half["path"], tokenizer, os.path.join(args.workdir, "half"), max(args.workers))
    results["preprocess_half_input"] = half_run
    print(f"half input ({half_run['input_mb']:.0f} MB), {max(args.workers)} workers: "
          f"largest process RSS {half_run['peak_rss_mb']:.0f} MB "
          f"(full input: {runs[-1]['peak_rss_mb']:.0f} MB)", flush=True)
    if not args.skip_parquet:
        pq_result = bench_parquet_files(corpus["path"], tokenizer, args.workdir, args.parquet_workers, args.rounds)
        results["parquet_four_files_against_one"] = pq_result
        print(f"parquet, {args.parquet_workers} workers: one file "
              + ", ".join(f"{t:,.0f}" for t in pq_result["one_file_tokens_per_s"]) + " tokens/s; 4 files "
              + ", ".join(f"{t:,.0f}" for t in pq_result["four_files_tokens_per_s"])
              + f" tokens/s (alternated); 4 files / one file: median {pq_result['median_ratio_four_over_one']:.2f}",
              flush=True)
    startup = min((run_preprocess(tiny["path"], tokenizer, os.path.join(args.workdir, "tiny"), max(args.workers))
                   for _ in range(3)), key=lambda r: r["wall_s"])
    results["startup_one_document_s"] = startup["wall_s"]
    print(f"start-up (one document, end to end): {startup['wall_s']:.2f} s", flush=True)

    if not args.skip_index:
        index = bench_sample_index(args.workdir, args.index_documents, 512)
        results["sample_index"] = index
        print(f"sample index: {index['documents']:,} documents, {index['tokens'] / 1e9:.1f}B tokens, "
              f"{index['samples']:,} "
              f"samples of 512: built + cached in {index['build_and_cache_s']:.1f} s (C++ build_sample_idx alone "
              f"{index['build_sample_idx_cpp_only_s']:.2f} s), cached reload {index['cached_reload_s']:.2f} s",
              flush=True)
    from megatron_lime.files import write_json

    write_json(os.path.join(args.workdir, "results.json"), results)
    print(f"results -> {os.path.join(args.workdir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
