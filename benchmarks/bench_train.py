"""Throughput of the training step on one device: tokens/s, TFLOP/s and MFU.

    python benchmarks/bench_train.py --model lime-1b --seq-length 512 --micro-batch-size 16     # one GPU
    python benchmarks/bench_train.py --model lime-mini --seq-length 256 --micro-batch-size 8    # CPU
    python benchmarks/bench_train.py --model lime-mini --compare-compile --skip-plain           # compiled vs eager

It times our real step (megatron_lime.training.pretrain.train_step on the DeepSpeed ZeRO-1
engine built by training.wrap: token counting, all-reduces, LR setting, clipping, skip check)
on random tokens. On CPU it also times a minimal plain-PyTorch loop on the same model, batch
and optimizer (AdamW with the same groups, clip_grad_norm_, fp32) in the same process,
alternating the two in rounds so both see the same machine state, and prints the overhead
of our stack (target: under 5%). On a GPU the step is bf16 (DeepSpeed's BF16 optimizer) and
MFU uses the peak of the GPU from training.metrics (or --peak-tflops).

--compare-compile also builds a second engine with --torch-compile (the blocks compiled, same weights
and batch), times its compilation separately (the warm-up steps), and reports the compiled/eager step
time ratio from the same alternating rounds. --packed-documents N splits every row into N documents
(document_ids and restarting position_ids, as the SFT packer makes): the document-masked attention path.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lime.config import PRESETS, LimeConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-mini", choices=list(PRESETS))
    parser.add_argument("--seq-length", type=int, default=None, help="default: the preset's max positions")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round and method")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for GPUs with bf16, off on CPU")
    parser.add_argument("--recompute-activations", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="compile the blocks of our engine")
    parser.add_argument("--compare-compile", action="store_true",
                        help="time an eager and a --torch-compile engine in the same run and report the ratio")
    parser.add_argument("--packed-documents", type=int, default=0,
                        help="split each row into this many documents (packed batch with document_ids)")
    parser.add_argument("--attention-backend", default=None, choices=["auto", "flash", "flex", "sdpa"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-plain", action="store_true", help="only time our stack")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (CPU device only; with OMP_NUM_THREADS=1 it is robust "
                             "to other processes loading a shared machine)")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step, steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per step over `steps` calls of step(), by the wall clock or by this process's CPU time."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(steps):
        step()
    synchronize(device)
    return (now() - start) / steps


def packed_layout(batch_size: int, seq: int, documents: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """document_ids and position_ids (batch_size, seq) for rows of `documents` documents of random lengths."""
    document_ids = torch.empty(batch_size, seq, dtype=torch.long)
    position_ids = torch.empty(batch_size, seq, dtype=torch.long)
    for row in range(batch_size):
        cuts = torch.randperm(seq - 1, generator=generator)[:documents - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, seq]
        for document, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            document_ids[row, start:end] = document
            position_ids[row, start:end] = torch.arange(end - start)
    return {"document_ids": document_ids, "position_ids": position_ids}


def main() -> int:
    options = parse_args()
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.metrics import peak_tflops_for
    from megatron_lime.training.pretrain import build_model, init_distributed, train_step
    from megatron_lime.training.wrap import build_optimizer, use_bf16, wrap_model

    flags = ["--model", options.model, "--train-iters", "1000000", "--micro-batch-size", str(options.micro_batch_size),
             "--global-batch-size", str(options.micro_batch_size), "--lr", "1e-4", "--min-lr", "1e-5",
             "--lr-warmup-iters", "0"]
    if options.seq_length:
        flags += ["--seq-length", str(options.seq_length)]
    if options.bf16 is not None:
        flags += ["--bf16" if options.bf16 else "--no-bf16"]
    if options.recompute_activations:
        flags += ["--recompute-activations"]
    if options.torch_compile:
        flags += ["--torch-compile"]
    if options.attention_backend:
        flags += ["--attention-backend", options.attention_backend]
    args = parse_training_args(flags)
    env = init_distributed()
    device = env.device
    if options.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU time: only for the CPU device")
    seq, batch_size = args.seq_length, options.micro_batch_size
    config: LimeConfig = args.model

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq + 1), generator=generator)
    batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
             "loss_mask": torch.ones(batch_size, seq, device=device)}
    if options.packed_documents > 1:
        batch.update({k: v.to(device) for k, v in packed_layout(batch_size, seq, options.packed_documents,
                                                                generator).items()})

    def engine_step(compile_blocks: bool) -> Callable[[], None]:
        run_args = copy.deepcopy(args)
        run_args.training.torch_compile = compile_blocks
        engine, _ = wrap_model(build_model(config, args.training.seed, device), run_args, device, 1)
        engine.train()
        return lambda: train_step(engine, [batch], args.optimizer.lr, device)

    bf16 = use_bf16(args, device)
    # With --compare-compile the first engine is the eager one, whatever --torch-compile says.
    compile_ours = args.training.torch_compile and not options.compare_compile
    our_step = engine_step(compile_ours)
    methods: dict[str, Callable[[], None]] = {f"megatron-lime (DeepSpeed){' compiled' if compile_ours else ''}": our_step}
    if options.compare_compile:
        methods["megatron-lime, torch.compile"] = engine_step(True)

    plain_step: Callable[[], None] | None = None
    if device.type == "cpu" and not options.skip_plain:
        plain_model = build_model(config, args.training.seed, device)
        plain_model.activation_checkpointing = args.training.recompute_activations
        plain_optimizer = build_optimizer(plain_model, args, device)
        plain_params = list(plain_model.parameters())

        def plain_step_impl() -> None:
            output = plain_model(**batch)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_params, args.training.clip_grad)
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)
            output.loss.item()  # our step reads the loss back too

        plain_step = plain_step_impl
        methods["plain PyTorch loop"] = plain_step

    # Warm-up (compilation included: it happens in the first steps) is timed apart from the rounds.
    warmup_seconds = {name: timed(step, options.warmup, device, options.clock) * options.warmup
                      for name, step in methods.items()}
    # Rounds rotate the methods' order, so a burst of load from other processes hits all alike;
    # comparisons are medians of the per-round ratios.
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_index in range(options.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(timed(methods[name], options.steps, device, options.clock))
    ours = seconds[names[0]]
    plain = seconds.get("plain PyTorch loop", [])

    flops_per_token = config.flops_per_token(seq)
    peak = peak_tflops_for(device, options.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{config.name}: {config.num_parameters() / 1e6:.1f}M parameters, seq {seq}, micro batch {batch_size}, "
          f"{'bf16' if bf16 else 'fp32'}, {device_name}; {options.rounds} rounds x {options.steps} steps per method, median, {options.clock} clock")

    def report(name: str, seconds: list[float]) -> float:
        per_step = statistics.median(seconds)
        tokens_per_second = batch_size * seq / per_step
        tflops = tokens_per_second * flops_per_token / 1e12
        mfu = "MFU n/a on CPU" if peak is None and device.type == "cpu" else (
            "MFU n/a (unknown GPU: pass --peak-tflops)" if peak is None else f"MFU {100 * tflops / peak:.1f}%")
        print(f"  {name:<28} {1000 * per_step:9.1f} ms/step  {tokens_per_second:10.0f} tokens/s  "
              f"{tflops:8.3f} TFLOP/s  {mfu}")
        return per_step

    for name in names:
        if name != "plain PyTorch loop":
            report(name, seconds[name])
    if options.compare_compile:
        compiled, eager = seconds["megatron-lime, torch.compile"], seconds[names[0]]
        ratios = [a / b for a, b in zip(compiled, eager)]
        print(f"  compiled / eager step time: {statistics.median(ratios):.3f} median of per-round ratios "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); warm-up of {options.warmup} steps incl. compilation: "
              f"{warmup_seconds['megatron-lime, torch.compile']:.1f} s compiled, {warmup_seconds[names[0]]:.1f} s eager")
    if plain:
        report("plain PyTorch loop", plain)
        ratios = [a / b for a, b in zip(ours, plain)]
        print(f"  overhead of our stack: {100 * (statistics.median(ratios) - 1):+.1f}% median of per-round ratios "
              f"(min {100 * (min(ratios) - 1):+.1f}%, max {100 * (max(ratios) - 1):+.1f}%; target < 5%)")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
