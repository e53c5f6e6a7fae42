#!/usr/bin/env python
"""What the checks run when a dataset is opened for training cost: the token-id scan and the
content fingerprint (megatron_lime/data/indexed_dataset.py), on a synthetic N-token uint16 file.

    python benchmarks/bench_dataset_checks.py --workdir /tmp/lime-bench --tokens 100000000

Prints each timing with the file in the page cache (warm) and after evicting its pages with
posix_fadvise(DONTNEED) (cold, read from disk), and the scan rate in GB/s.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from bench_common import Stopwatch
from megatron_lime.data.indexed_dataset import IndexedDataset, write_index


def evict(*paths: str) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the synthetic .bin/.idx is written (kept for reruns).")
    parser.add_argument("--tokens", type=int, default=100_000_000, help="Tokens in the synthetic file.")
    parser.add_argument("--repeats", type=int, default=3, help="Timings per setting; the best is reported.")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    prefix = os.path.join(args.workdir, f"checks_{args.tokens}_text_document")
    if not os.path.isfile(prefix + ".idx"):
        rng = np.random.default_rng(0)
        with open(prefix + ".bin", "wb") as f:
            for start in range(0, args.tokens, 10_000_000):
                f.write(rng.integers(0, 50_000, min(10_000_000, args.tokens - start), dtype=np.uint16).tobytes())
        write_index(prefix + ".idx", np.uint16, np.full(args.tokens // 1000, 1000, dtype=np.int32))
    size_gb = os.path.getsize(prefix + ".bin") / 1e9
    results = {}
    for name, check in (("token-id scan", lambda ds: ds.check_token_ids(50_000)),
                        ("content fingerprint", lambda ds: ds.fingerprint())):
        for state in ("warm", "cold"):
            best = float("inf")
            for _ in range(args.repeats):
                ds = IndexedDataset(prefix)
                check(ds)  # warms the page cache
                ds = IndexedDataset(prefix)
                if state == "cold":
                    evict(prefix + ".bin", prefix + ".idx")
                with Stopwatch() as watch:
                    check(ds)
                best = min(best, watch.seconds)
            results[(name, state)] = best
            print(f"{name:20s} {state}: {best:.3f} s for {args.tokens:,} tokens "
                  f"({size_gb / best:.1f} GB/s of .bin size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
