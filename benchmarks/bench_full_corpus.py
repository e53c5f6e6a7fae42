#!/usr/bin/env python
"""The model card's corpus at full size, opened for training: start-up time and the memory each rank owns.

    python benchmarks/bench_full_corpus.py --workdir /tmp/lime-full    # ~20B tokens: 40 GB sparse .bin

Writes a synthetic Megatron-format dataset of the card's size (default 20.0M documents of 1 to 1,999 tokens,
about 20.0B tokens: a real .idx, 400 MB, and a sparse .bin of 40 GB that takes no disk), then starts the
literal launcher (`bash examples/pretrain_lime_1b.sh`, 2 ranks on a machine without GPUs) twice on it for
a 39M-sample run (--train-tokens 20e9 at sequence length 512 and global batch 16: 39,062,512 samples), each
start stopping at iteration 2 (--exit-interval 2) from scratch:

  first start   no index cache: the token-id scan reads the whole .bin, rank 0 builds the document,
                sample and shuffle indices (39M samples) and caches them next to the data
  second start  everything cached: what every later start (a resume, a preemption) costs

and, for comparison, reads the .bin once (the same 64 MiB chunks the scan reads, no computing): the floor
of a first start. Reported: each start's wall time (the launcher's, from its start to its exit), each rank's
peak own memory sampled from outside every 0.1 s (RssAnon + RssShmem of /proc/PID/status: what the process
owns, not the file pages it maps), the memory figure the log line prints, and the goodput line's start-up.
The model is lime-tiny (the model is not what is measured; its steps take milliseconds).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench_common import Stopwatch  # noqa: E402
from megatron_lime.data.indexed_dataset import IndexedDataset, write_index  # noqa: E402
from megatron_lime.training.metrics import owned_memory_bytes  # noqa: E402


def write_corpus(prefix: str, documents: int, seed: int = 0) -> tuple[int, float]:
    """The .idx of `documents` documents of 1..1999 tokens and a sparse .bin of matching size (token id 0
    throughout). Returns (tokens, seconds)."""
    with Stopwatch() as watch:
        lengths = np.random.default_rng(seed).integers(1, 2000, documents, dtype=np.int32)
        tokens = int(lengths.sum(dtype=np.int64))
        write_index(prefix + ".idx", np.uint16, lengths)
        with open(prefix + ".bin", "wb") as f:
            f.truncate(2 * tokens)
    return tokens, watch.seconds


def read_bin_once(prefix: str) -> tuple[float, float]:
    """(seconds, GB/s) to read the .bin once in the token-id scan's chunks, without looking at the tokens."""
    dataset = IndexedDataset(prefix)
    with Stopwatch() as watch:
        for _ in dataset._chunks():
            pass
    return watch.seconds, os.path.getsize(dataset.bin_path) / watch.seconds / 1e9


def tokenizer_for(workdir: str) -> str:
    """A small tokenizer (tools/train_tokenizer.py on the sample corpus): the run needs one, the ids are all 0."""
    out = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(out, "tokenizer_info.json")):
        from megatron_lime.sample_data import write_pretraining_corpus

        corpus = os.path.join(workdir, "tokenizer_corpus.jsonl")
        write_pretraining_corpus(corpus, max_bytes=400_000)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                        "--output-dir", out, "--vocab-size", "512"], check=True, stdout=subprocess.DEVNULL)
    return out


class RankMemory:
    """Samples every rank's own memory (owned_memory_bytes) every 0.1 s while the launcher runs."""

    def __init__(self, launcher_pid: int):
        import psutil

        self.launcher = psutil.Process(launcher_pid)
        self.peaks: dict[int, int] = {}  # local rank -> bytes
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                ranks = [p for p in self.launcher.children(recursive=True)
                         if any(a.startswith("--local_rank=") for a in p.cmdline())]
            except psutil.Error:
                ranks = []
            for rank in ranks:
                try:
                    local = int(next(a for a in rank.cmdline() if a.startswith("--local_rank=")).split("=")[1])
                    self.peaks[local] = max(self.peaks.get(local, 0), owned_memory_bytes(rank.pid))
                except (psutil.Error, OSError, StopIteration):
                    pass
            time.sleep(0.1)

    def stop(self) -> dict[int, int]:
        self.done.set()
        self.thread.join()
        return self.peaks


def start_run(prefix: str, tokenizer: str, save: str, log_path: str) -> dict:
    """One start of the literal launcher, to iteration 2; returns its wall time, memory and log figures."""
    shutil.rmtree(save, ignore_errors=True)
    from megatron_lime.training.launch import free_port

    env = {**os.environ, "DATA_PATH": prefix, "TOKENIZER_MODEL": tokenizer, "SAVE_DIR": save,
           "MASTER_PORT": str(free_port()), "CPU_PROCESSES": "2"}
    command = ["bash", os.path.join(REPO, "examples", "pretrain_lime_1b.sh"), "--model", "lime-tiny",
               "--vocab-size", "512", "--seq-length", "512", "--micro-batch-size", "8", "--global-batch-size", "16",
               "--train-tokens", "20000000000", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
               "--exit-interval", "2", "--num-workers", "0"]
    with Stopwatch() as launcher, open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        memory = RankMemory(process.pid)
        status = process.wait()
    seconds = launcher.seconds
    peaks = memory.stop()
    output = open(log_path).read()
    if status != 0:
        raise RuntimeError(f"the run failed ({status}); its log {log_path} ends:\n{output[-3000:]}")
    logged = [float(m) for m in re.findall(r"peak memory ([0-9.]+) GiB \(owned\)", output)]
    startup = re.search(r"start-up (\S+) \(", output)
    return {"seconds": seconds, "peaks": peaks, "logged_gib": max(logged) if logged else None,
            "startup": startup.group(1) if startup else "?",
            "reached_2": bool(re.search(r"iteration\s+2/", output)), "log": log_path}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="Where the dataset, its caches and the logs go (kept for "
                                                        "reruns; default: a temporary folder, removed).")
    parser.add_argument("--documents", type=int, default=20_000_000, help="Documents in the synthetic corpus.")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_full_corpus_")
    os.makedirs(workdir, exist_ok=True)
    prefix = os.path.join(workdir, f"full_{args.documents}_text_document")
    try:
        if not os.path.isfile(prefix + ".idx"):
            tokens, seconds = write_corpus(prefix, args.documents)
            print(f"wrote {args.documents:,} documents, {tokens:,} tokens ({2 * tokens / 1e9:.1f} GB sparse .bin, "
                  f"{os.path.getsize(prefix + '.idx') / 1e6:.0f} MB .idx) in {seconds:.1f} s", flush=True)
        dataset = IndexedDataset(prefix)
        print(f"dataset: {len(dataset):,} documents, {dataset.num_tokens:,} tokens; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
        tokenizer = tokenizer_for(workdir)
        shutil.rmtree(os.path.join(workdir, "index-cache"), ignore_errors=True)
        read_seconds, rate = read_bin_once(prefix)
        print(f"reading the .bin once (64 MiB chunks, no computing): {read_seconds:.1f} s ({rate:.2f} GB/s)",
              flush=True)
        save = os.path.join(workdir, "save")
        for name in ("first", "second"):
            result = start_run(prefix, tokenizer, save, os.path.join(workdir, f"{name}_start.log"))
            ranks = ", ".join(f"rank {r} {b / 2**30:.2f} GiB" for r, b in sorted(result["peaks"].items()))
            print(f"{name} start: {result['seconds']:.1f} s launcher wall time (reached iteration 2: "
                  f"{result['reached_2']}); peak own memory sampled every 0.1 s: {ranks}; the log line's figure "
                  f"(rank 0): {result['logged_gib']} GiB (owned); goodput line's start-up {result['startup']}; "
                  f"log {result['log']}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
