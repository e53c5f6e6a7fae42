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
time ratio from the same alternating rounds. --packed-documents N packs every row with documents of seq / N
tokens (document_ids and restarting position_ids, every token trained): the document-masked attention path.
Batches and the step timer are bench_common's, shared with bench_gpu_train.py and bench_gpu_peer.py.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable

import torch

from bench_common import packed_batch, pretraining_batch, seconds_per_step
from megatron_lime.config import PRESETS, LimeConfig


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
                        help="pack each row with documents of seq / N tokens (document_ids, position_ids)")
    parser.add_argument("--attention-backend", default=None, choices=["auto", "flash", "flex", "sdpa"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--skip-plain", action="store_true", help="only time our stack")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (CPU device only; with OMP_NUM_THREADS=1 it is robust "
                             "to other processes loading a shared machine)")
    return parser.parse_args()


def main() -> int:
    options = parse_args()
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.metrics import peak_memory_gib, peak_tflops_for
    from megatron_lime.training.distributed import init_distributed
    from megatron_lime.training.pretrain import build_model, train_step
    from megatron_lime.training.wrap import build_optimizer, resolve_precision, wrap_model

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
    if options.packed_documents > 1:
        length = seq // options.packed_documents
        batch = packed_batch(config.vocab_size, batch_size, seq, device, generator, shortest=length, longest=length,
                             prompt_fraction=0.0)
    else:
        batch = pretraining_batch(config.vocab_size, batch_size, seq, device, generator)

    def engine_step(compile_blocks: bool) -> Callable[[], None]:
        run_args = copy.deepcopy(args)
        run_args.training.torch_compile = compile_blocks
        engine, _ = wrap_model(build_model(config, args.training.seed, device), run_args, device, 1)
        engine.train()
        return lambda: train_step(engine, [batch], args.optimizer.lr, device)

    precision = resolve_precision(args, device)
    # With --compare-compile the first engine is the eager one, whatever --torch-compile says.
    compile_ours = args.training.torch_compile and not options.compare_compile
    our_step = engine_step(compile_ours)
    ours_name = f"megatron-lime (DeepSpeed){' compiled' if compile_ours else ''}"
    methods: dict[str, Callable[[], None]] = {ours_name: our_step}
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
    warmup_seconds = {name: seconds_per_step(step, options.warmup, device, options.clock) * options.warmup
                      for name, step in methods.items()}
    # Rounds rotate the methods' order, so a burst of load from other processes hits all alike;
    # comparisons are medians of the per-round ratios.
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_index in range(options.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(seconds_per_step(methods[name], options.steps, device, options.clock))
    ours = seconds[names[0]]
    plain = seconds.get("plain PyTorch loop", [])

    flops_per_token = config.flops_per_token(seq)
    peak = peak_tflops_for(device, options.peak_tflops)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads)")
    print(f"{config.name}: {config.num_parameters() / 1e6:.1f}M parameters, seq {seq}, micro batch {batch_size}, "
          f"{precision}, {device_name}; {options.rounds} rounds x {options.steps} steps per method, "
          f"median, {options.clock} clock")

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
              f"{warmup_seconds['megatron-lime, torch.compile']:.1f} s compiled, "
              f"{warmup_seconds[names[0]]:.1f} s eager")
    if plain:
        report("plain PyTorch loop", plain)
        ratios = [a / b for a, b in zip(ours, plain)]
        print(f"  overhead of our stack: {100 * (statistics.median(ratios) - 1):+.1f}% median of per-round ratios "
              f"(min {100 * (min(ratios) - 1):+.1f}%, max {100 * (max(ratios) - 1):+.1f}%; target < 5%)")
    if device.type == "cuda":
        print(f"  peak memory {peak_memory_gib(device):.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
