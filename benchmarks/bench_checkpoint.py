"""What checkpoint integrity costs: hash rates, and a save and a resume with and without hashing.

    python benchmarks/bench_checkpoint.py                      # lime-125m, 3 alternating rounds
    python benchmarks/bench_checkpoint.py --model lime-tiny --rounds 2 --hash-mib 64   # a quick look

One process (data-parallel size 1, CPU, fp32, DeepSpeed ZeRO-1 with a torch AdamW after one step, as the
trainer runs on CPU). The save is training/checkpointing.Checkpointer.save (DeepSpeed's files, the RNG
file, ds_config.json, lime_config.json, `latest`), the resume Checkpointer.resume; "without hashing" runs
the same code with integrity.hash_files / Checkpointer.verify replaced by no-ops. Rounds alternate
with/without, so a load change on a shared machine hits both alike; the table gives the median and range.
Files go to --dir (default: a temporary folder on the disk of /tmp), through the page cache as training's
do (DeepSpeed does not fsync). The last blocks project the cost onto a lime-1b save from the measured rates,
and the time a lime-1b save blocks training against the steps between two saves at the recipe's
--save-interval (goodput): rank 0's bytes at the hashed save's measured rate (every rank writes its own files
at once, into the page cache), the step time from the recipe's arithmetic (8 x A100, 62/50/40% MFU).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench_common import Stopwatch  # noqa: E402 - after DS_ACCELERATOR: it imports torch and the library


def hash_rates(mib: int, rounds: int) -> dict[str, list[float]]:
    """GB/s of each algorithm over `mib` MiB in memory, fed in 16 MiB pieces (as file_hash reads)."""
    from megatron_lime.checkpoint import integrity

    data = memoryview(os.urandom(mib << 20))
    algorithms = ["sha256", "blake2b"] + (["xxh3_128", "xxh64"] if integrity.xxhash is not None else [])
    rates: dict[str, list[float]] = {a: [] for a in algorithms}
    for _ in range(rounds):
        for algorithm in algorithms:
            digest = getattr(integrity.xxhash, algorithm)() if algorithm.startswith("xxh") else hashlib.new(algorithm)
            with Stopwatch() as watch:
                for offset in range(0, len(data), 16 << 20):
                    digest.update(data[offset:offset + (16 << 20)])
                digest.hexdigest()
            rates[algorithm].append(len(data) / watch.seconds / 1e9)
    return rates


def build_engine(model_name: str):
    import deepspeed
    import torch

    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel

    config = LimeConfig.from_name(model_name)
    torch.manual_seed(0)
    model = LimeModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                 "bf16": {"enabled": False}, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    tokens = torch.randint(0, config.vocab_size, (1, 64))
    loss = engine(tokens).logits.float().mean()  # one step, so the optimizer holds its moments
    engine.backward(loss)
    engine.step()
    return engine, config, ds_config


def hashing_share(times: dict[str, list[float]]) -> float:
    return statistics.median(h / s for h, s in zip(times["  of which hashing"], times["save, hashed"]))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lime-125m",
                        help="Preset whose weights and AdamW state are saved (default: lime-125m).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds (each: with and without).")
    parser.add_argument("--hash-mib", type=int, default=512, help="MiB hashed per algorithm and round.")
    parser.add_argument("--dir", default=None, help="Where the checkpoints go (default: a temporary folder).")
    parser.add_argument("--save-interval", type=int, default=1000,
                        help="Steps between saves in the projection (examples/pretrain_lime_1b.sh: 1000).")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_lime.checkpoint import integrity, resolve_load
    from megatron_lime.config import LimeConfig
    from megatron_lime.training.checkpointing import Checkpointer, TrainState

    load = os.getloadavg()
    rates = hash_rates(args.hash_mib, args.rounds)

    from megatron_lime.training.distributed import init_distributed

    init_distributed()  # the trainer's own: a group of one, gloo on CPU
    engine, config, ds_config = build_engine(args.model)
    root = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    real_hash_files, real_verify = integrity.hash_files, Checkpointer.verify
    times: dict[str, list[float]] = {"save": [], "save, hashed": [], "resume": [], "resume, verified": [],
                                     "  of which hashing": []}

    def timed_hash_files(*a, **k):
        with Stopwatch() as watch:
            try:
                return real_hash_files(*a, **k)
            finally:
                times["  of which hashing"].append(watch.seconds)

    saved_bytes = 0
    try:
        checkpointer = Checkpointer(root, 1, 1, {"model": config.to_dict()}, ds_config, rank=0, world_size=1)
        iteration = 0
        for round_index in range(args.rounds):
            # Alternate which goes first: the second save of a pair starts while the first one's 2 GB may
            # still be written back from the page cache.
            for hashed in ((False, True) if round_index % 2 == 0 else (True, False)):
                integrity.hash_files = timed_hash_files if hashed else (lambda folder, paths, *a, **k: {})
                Checkpointer.verify = real_verify if hashed else (lambda self, source, names: None)
                iteration += 1
                with Stopwatch() as saving:
                    tag_dir = checkpointer.save(engine, TrainState(iteration=iteration))
                times["save, hashed" if hashed else "save"].append(saving.seconds)
                saved_bytes = folder_bytes(tag_dir)
                source = resolve_load(root)
                with Stopwatch() as resuming:
                    checkpointer.resume(engine, source, weights_only=False, universal=False)
                times["resume, verified" if hashed else "resume"].append(resuming.seconds)
    finally:
        integrity.hash_files, Checkpointer.verify = real_hash_files, real_verify
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):7.2f}  ({min(values):.2f}-{max(values):.2f})"

    print(f"\nload average at the start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs; "
          f"{args.rounds} alternating rounds")
    print(f"\nhash rate, {args.hash_mib} MiB in memory   GB/s median (range)")
    for algorithm, values in rates.items():
        chosen = "  <- training checkpoints" if algorithm == integrity.HASH_ALGORITHM else ""
        chosen += "  <- exports" if algorithm == integrity.EXPORT_HASH_ALGORITHM else ""
        print(f"  {algorithm:10}                       {med(values)}{chosen}")
    gb = saved_bytes / 1e9
    print(f"\n{args.model}: one save = {gb:.2f} GB ({integrity.HASH_ALGORITHM})   seconds median (range)")
    for name, values in times.items():
        print(f"  {name:32} {med(values)}")
    save, hashed = statistics.median(times["save"]), statistics.median(times["save, hashed"])
    resume, verified = statistics.median(times["resume"]), statistics.median(times["resume, verified"])
    print(f"  hashing: {100 * hashing_share(times):.1f}% of a hashed save's time; whole saves differ by "
          f"{100 * (hashed - save) / save:+.1f}%; "
          f"verifying {100 * (verified - resume) / resume:+.1f}% to the resume")

    # lime-1b: bf16 training keeps bf16 module weights (2 B/param, rank 0) and fp32 master + two AdamW moments
    # (12 B/param, split over the data-parallel ranks). Every rank hashes its own files at once, so the
    # added time is that of the rank with the most bytes, and the save's write rate is the one measured here.
    params = LimeConfig.from_name("lime-1b").num_parameters()
    write_rate = gb / save  # GB/s of a save without hashing, measured above
    hash_rate = statistics.median(rates[integrity.HASH_ALGORITHM])
    print(f"\nlime-1b ({params / 1e9:.2f}B parameters), bf16 + ZeRO-1 on 8 data-parallel ranks, "
          "rank 0 (the most bytes):")
    rank0 = (2 * params + 12 * params / 8) / 1e9
    print(f"  bytes = 2 B x {params / 1e9:.2f}B (model states) + 12 B x {params / 1e9:.2f}B / 8 (its optimizer shard) "
          f"= {rank0:.2f} GB")
    print(f"  save  = {rank0:.2f} GB / {write_rate:.2f} GB/s (measured save rate) = {rank0 / write_rate:.1f} s")
    print(f"  hash  = {rank0:.2f} GB / {hash_rate:.2f} GB/s ({integrity.HASH_ALGORITHM}, measured) = "
          f"{rank0 / hash_rate:.1f} s  ->  +{100 * write_rate / hash_rate:.1f}% (the hash alone, bytes in memory)")
    hashing = statistics.median(times["  of which hashing"])  # timed directly: less noisy than a difference
    in_save = gb / hashing  # files read back (memory-mapped) from the page cache right after the write
    print(f"  inside the save, hashing took {hashing:.2f} s for {gb:.2f} GB = {in_save:.2f} GB/s  ->  "
          f"+{100 * write_rate / in_save:.1f}% of a lime-1b save (bound: 10%)")
    for algorithm, values in rates.items():
        if algorithm != integrity.HASH_ALGORITHM:
            print(f"  with {algorithm} instead: +{100 * write_rate / statistics.median(values):.1f}%")

    # Goodput: the time a save blocks training, against the steps between two saves. The step time is the
    # recipe's arithmetic (examples/pretrain_lime_1b.sh: 262,144 tokens per step, 6.20e9 FLOPs per token,
    # 8 x A100 at 312 TFLOP/s bf16), at the MFU the header assumes and at lower ones.
    lime_1b = LimeConfig.from_name("lime-1b")
    blocking = rank0 / gb * hashed  # the hashed save measured here, scaled to rank 0's bytes
    print(f"\nblocking checkpoint time, lime-1b every {args.save_interval} steps (the recipe's --save-interval):")
    print(f"  one save blocks {rank0:.2f} GB / ({gb:.2f} GB in {hashed:.2f} s, the hashed save above) = "
          f"{blocking:.1f} s")
    for mfu in (0.62, 0.50, 0.40):
        step = lime_1b.flops_per_token(512) * 512 * 512 / (8 * 312e12 * mfu)
        interval = args.save_interval * step
        print(f"  at {100 * mfu:.0f}% MFU: {step:.2f} s/step x {args.save_interval} = {interval:.0f} s of steps "
              f"-> saving is {100 * blocking / (interval + blocking):.2f}% of the wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
