"""Peak memory of one training forward+backward with the chunked cross-entropy against materialised logits.

    python benchmarks/bench_loss_memory.py --model lime-125m --micro-batch-size 4 --seq-length 512

Each variant runs in its own subprocess (a fresh high-water mark): it builds the model in fp32, records its
peak RSS (resource.getrusage maxrss) after building the model and the batch, runs one forward+backward, and
records the peak again. Reported: the peak RSS of the process, the step's growth above what was resident
before it, and the ratios chunked / materialised of both. On CUDA the same for the peak of allocated GPU memory
(bench_common's reset and the training log line's peak_memory_gib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-125m", help="model preset")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=None, help="loss chunk size (default: the config's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set in the child processes
    return parser.parse_args(argv)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(options: argparse.Namespace) -> dict:
    """One variant, in this process: peak memory before and after one forward+backward."""
    import torch

    # Here, not at the top: the parent starts the variants before it imports torch, since a child's peak RSS
    # starts at its parent's (the high-water mark survives fork and exec).
    from bench_common import Stopwatch, peak_memory_gib, reset_peak_memory
    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel

    overrides = {"max_position_embeddings": max(options.seq_length, 1)}
    if options.variant == "materialised":
        overrides["loss_chunk_size"] = 0
    elif options.chunk_size is not None:
        overrides["loss_chunk_size"] = options.chunk_size
    config = LimeConfig.from_name(options.model, **overrides)
    device = torch.device(options.device)
    torch.manual_seed(0)
    model = LimeModel(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (options.micro_batch_size, options.seq_length + 1), device=device)
    reset_peak_memory(device)
    before = peak_rss_bytes()
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with Stopwatch(device) as watch:
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        loss = out.loss.item()
    result = {"variant": options.variant, "loss_chunk_size": config.loss_chunk_size, "loss": loss,
              "seconds": watch.seconds, "peak_rss": peak_rss_bytes(), "rss_before_step": before}
    if device.type == "cuda":
        result["peak_allocated"] = peak_memory_gib(device) * 2**30  # bytes, as peak_rss
        result["allocated_before_step"] = allocated_before
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.variant:
        print(json.dumps(measure(options)))
        return 0
    results = {}
    for variant in ("materialised", "chunked"):
        command = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--variant", variant]
        print(f"[{variant}] one forward+backward in a fresh process ...", flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            print(f"error: the {variant} run failed (exit {done.returncode})", file=sys.stderr)
            return 1
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    from megatron_lime.config import LimeConfig

    config = LimeConfig.from_name(options.model)
    tokens = options.micro_batch_size * options.seq_length

    def mib(n: float) -> str:
        return f"{n / 2**20:8.0f} MiB"

    print(f"{options.model}, micro batch {options.micro_batch_size}, seq {options.seq_length} ({tokens} tokens), fp32, "
          f"{options.device}; all logits in fp32 would be {mib(4 * tokens * config.vocab_size).strip()}")
    print(f"  {'variant':<14} {'chunk':>6} {'peak RSS':>12} {'step growth':>12} {'step s':>7}  loss")
    for name, r in results.items():
        print(f"  {name:<14} {r['loss_chunk_size']:>6} {mib(r['peak_rss']):>12} "
              f"{mib(r['peak_rss'] - r['rss_before_step']):>12} {r['seconds']:7.1f}  {r['loss']:.6f}")
    m, c = results["materialised"], results["chunked"]
    print(f"  chunked / materialised: peak RSS {c['peak_rss'] / m['peak_rss']:.2f}, step growth "
          f"{(c['peak_rss'] - c['rss_before_step']) / (m['peak_rss'] - m['rss_before_step']):.2f}")
    if "peak_allocated" in m:
        print(f"  peak allocated: materialised {mib(m['peak_allocated'])}, chunked {mib(c['peak_allocated'])}, "
              f"ratio {c['peak_allocated'] / m['peak_allocated']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
