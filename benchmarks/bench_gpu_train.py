"""lime-1b training throughput on one GPU through the real training step: tokens/s, TFLOP/s, MFU, memory, a profile.

    python benchmarks/bench_gpu_train.py --json train.json --profile-md profile_ours.md   # what gpu_check.sh runs
    python benchmarks/bench_gpu_train.py --shapes 32x2 --modes compile --batch-kinds pretrain
    python benchmarks/bench_gpu_train.py --dry-run            # every code path at tiny sizes, on the CPU too

For each mode (eager, then compile; each in a process of its own, so no memory of one counts in the other's peak)
one model is built and wrapped by the training code itself
(training.wrap.wrap_model: torch.compile of the blocks for "compile", DeepSpeed ZeRO-1, bf16 with fp32 master
weights, torch's fused AdamW, the DeepSpeed config the trainer builds), and every row runs
training.pretrain.train_step, the loop's own step: token counting, all-reduces, LR, clipping, skip check.
A row is a batch kind and a shape MICROxSTEPS: STEPS micro-batches of MICRO sequences per optimizer step
(DeepSpeed's gradient accumulation; the engine's accumulation count is set per row). The default shapes are
one micro-batch per step (16x1, 32x1) and 64 sequences per step (16x4, 32x2, 64x1: the recipe's global batch
of 512 on 8 GPUs). Each row runs --warmup steps, then times --steps steps (the device drained before and after).
One row per mode (--profile-shape, pretraining) is then run under torch.profiler for --profile-steps steps: the
top 20 CUDA kernels, the share of the step the GPU is idle and the host syncs, as markdown (--profile-md).

Tokens/s counts every position of every sequence; TFLOP/s counts LimeConfig.flops_per_token (6N + 12 L d s, the
whole causal sequence as Megatron counts it, packed batches too); MFU divides by the datasheet's dense bf16
peak (training.metrics, or --peak-tflops). A bf16 matmul timed in the same process says what this GPU's
matrix units deliver today. benchmarks/bench_gpu_peer.py times a plain PyTorch loop over transformers' GPT-2
with the same dims on the same rows; gpu_check.sh prints the two side by side.

--dry-run runs all of it at tiny sizes (lime-tiny, seq 64, fp32 on a CPU) so the test suite proves the script.
Without a GPU and without --dry-run it says so and exits 2.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

import torch

from bench_common import (BATCH_KINDS, DEFAULT_SHAPES, MODES, Row, format_row, make_batch, matmul_tflops,
                          parse_shape, profile_steps, profile_table, rows_for, run_modes_apart, throughput,
                          timed_steps)
from megatron_lime.config import PRESETS, LimeConfig
from megatron_lime.files import write_json, write_text

DRY_RUN = {"model": "lime-tiny", "seq_length": 64, "shapes": ["2x1", "2x2"], "sft_shapes": ["2x2"], "warmup": 1,
           "steps": 3, "profile_shape": "2x2", "profile_steps": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-1b", choices=list(PRESETS), help="model preset (default lime-1b)")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="pretraining rows as MICROxSTEPS: micro-batch size x micro-batches per optimizer step "
                             f"(default {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--sft-shapes", nargs="+", default=["16x1", "32x2"],
                        help="the packed SFT rows, as --shapes (default 16x1 32x2)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="eager and/or compile")
    parser.add_argument("--batch-kinds", nargs="+", choices=BATCH_KINDS, default=list(BATCH_KINDS),
                        help="random pretraining tokens and/or packed SFT rows")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation included)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--profile-shape", default="32x2",
                        help="the pretraining row profiled in each mode ('none' for no profile)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler")
    parser.add_argument("--profile-md", default=None, help="write the profile tables here (markdown)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="the bf16 matmul that measures this GPU's rate")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="datasheet dense bf16 peak (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every row)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (lime-tiny, seq 64, shapes 2x1 2x2), on the CPU when there is no GPU")
    options = parser.parse_args(argv)
    if options.dry_run:
        options.model, options.seq_length = DRY_RUN["model"], DRY_RUN["seq_length"]
        options.shapes, options.sft_shapes = DRY_RUN["shapes"], DRY_RUN["sft_shapes"]
        options.warmup, options.steps = DRY_RUN["warmup"], DRY_RUN["steps"]
        options.profile_shape, options.profile_steps = DRY_RUN["profile_shape"], DRY_RUN["profile_steps"]
    try:
        accumulations = {parse_shape(shape)[1] for shape in options.shapes + options.sft_shapes}
        if options.profile_shape != "none":
            accumulations.add(parse_shape(options.profile_shape)[1])
    except ValueError as error:
        parser.error(str(error))
    # DeepSpeed steps the optimizer when (its micro-step count + 1) is a multiple of the accumulation count; a row
    # starts on a boundary only if every row before it ran a whole multiple of every accumulation count.
    for accumulation in accumulations:
        if ((options.warmup + options.steps) * max(accumulations)) % accumulation:
            parser.error(f"--warmup + --steps ({options.warmup + options.steps}) times the largest accumulation "
                         f"({max(accumulations)}) must be a multiple of every accumulation count "
                         f"{sorted(accumulations)}")
    if options.steps <= 0 or options.warmup < 0:
        parser.error("--steps must be positive and --warmup non-negative")
    return options


def run_mode(mode: str, rows: list[Row], options: argparse.Namespace, device: torch.device, results: dict[str, Any],
             report, report_profile) -> None:
    """One engine for the mode; every row of the mode through train_step; the profiled row under torch.profiler."""
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.pretrain import build_model, train_step
    from megatron_lime.training.wrap import wrap_model

    largest = max(row.micro_batch for row in rows)
    flags = ["--model", options.model, "--seq-length", str(options.seq_length), "--train-iters", "1000000",
             "--micro-batch-size", str(largest), "--global-batch-size", str(largest),
             "--bf16" if device.type == "cuda" else "--no-bf16",
             "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "0"]
    if mode == "compile":
        flags.append("--torch-compile")
    args = parse_training_args(flags)
    config: LimeConfig = args.model
    engine, _ = wrap_model(build_model(config, args.training.seed, device), args, device, 1)
    engine.train()
    flops_per_token = config.flops_per_token(options.seq_length)
    generator = torch.Generator().manual_seed(0)
    profile_shape = None if options.profile_shape == "none" else parse_shape(options.profile_shape)
    for row in rows:
        # DeepSpeed counts micro-batches against its configured accumulation: set it per row.
        engine.set_train_micro_batch_size(row.micro_batch)
        engine.set_train_batch_size(row.sequences_per_step)
        if engine.micro_steps % row.accumulation:
            raise RuntimeError(f"{row.name}: the engine is {engine.micro_steps % row.accumulation} micro-batches "
                               f"past an optimizer step (see --warmup/--steps)")
        batches = [make_batch(row.kind, config.vocab_size, row.micro_batch, options.seq_length, device, generator)
                   for _ in range(row.accumulation)]
        results_of_steps = []

        def step() -> None:
            results_of_steps.append(train_step(engine, batches, args.optimizer.lr, device))

        timing = timed_steps(step, options.warmup, options.steps, device)
        if "error" in timing:
            report(row.name, timing)
            del batches, results_of_steps
            gc.collect()
            torch.cuda.empty_cache()
            engine.optimizer.zero_grad()
            continue
        peak = results["datasheet_peak_tflops"]
        figures = throughput(row, options.seq_length, timing["seconds"], flops_per_token, peak, device)
        figures["mfu_measured_matmul"] = (figures["tflops"] / results["matmul_tflops"]
                                          if results.get("matmul_tflops") else None)
        figures.update(first_loss=results_of_steps[0].loss, last_loss=results_of_steps[-1].loss,
                       skipped_steps=sum(result.skipped for result in results_of_steps),
                       trained_tokens_per_step=results_of_steps[-1].trained_tokens,
                       wall_seconds_with_warmup=timing["wall_seconds_with_warmup"])
        report(row.name, figures)
        if row.kind == "pretrain" and (row.micro_batch, row.accumulation) == profile_shape:
            profile = profile_steps(step, options.profile_steps, device)
            results["profiles"][row.name] = profile
            report_profile(row.name, profile)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if len(options.modes) > 1:  # each mode's memory in a process of its own
        return run_modes_apart(__file__, sys.argv[1:] if argv is None else argv, options.modes, options.json,
                               options.profile_md)
    if not torch.cuda.is_available() and not options.dry_run:
        print("bench_gpu_train: no CUDA GPU (torch.cuda.is_available() is False): this benchmark needs one "
              "(--dry-run runs its code at tiny sizes on the CPU)", file=sys.stderr)
        return 2
    from megatron_lime.training.metrics import peak_tflops_for
    from megatron_lime.training.pretrain import init_distributed

    # Static shapes: each micro-batch size compiles its own graph instead of a slower dynamic one.
    torch._dynamo.config.automatic_dynamic_shapes = False
    env = init_distributed()
    device = env.device
    config = LimeConfig.from_name(options.model)
    cuda = device.type == "cuda"
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "torch": torch.__version__,
        "cuda": torch.version.cuda, "model": options.model, "parameters": config.num_parameters(),
        "seq_length": options.seq_length, "flops_per_token": config.flops_per_token(options.seq_length),
        "datasheet_peak_tflops": peak_tflops_for(device, options.peak_tflops),
        "matmul_size": options.matmul_size,
        "matmul_tflops": matmul_tflops(options.matmul_size, device) if cuda else None,
        "warmup_steps": options.warmup, "timed_steps": options.steps, "dry_run": options.dry_run,
        "runs": {}, "profiles": {},
    }
    matmul = f"{results['matmul_tflops']:.0f} TFLOP/s" if cuda else "n/a"
    print(f"{results['gpu']}; torch {results['torch']} (CUDA {results['cuda']}); {options.model} "
          f"({results['parameters'] / 1e6:.0f}M parameters), seq {options.seq_length}, DeepSpeed ZeRO-1 "
          f"{'bf16' if cuda else 'fp32'}; bf16 {options.matmul_size}^3 matmul: {matmul}; datasheet peak: "
          f"{results['datasheet_peak_tflops'] or 'n/a'} TFLOP/s; {options.warmup} warm-up + {options.steps} timed "
          f"steps per row", flush=True)
    profile_text: list[str] = []

    def save() -> None:
        if options.json:
            write_json(options.json, results)

    def report(name: str, row: dict[str, Any]) -> None:
        results["runs"][name] = row
        save()
        print(format_row(name, row), flush=True)

    def report_profile(name: str, profile: dict) -> None:
        profile_text.append(profile_table(f"ours: {name} ({results['gpu']}, torch {results['torch']})", profile))
        save()
        if options.profile_md:
            write_text(options.profile_md, "\n".join(profile_text))
        print(profile_text[-1], flush=True)

    failed = False
    rows = rows_for(options.batch_kinds, options.shapes, options.modes, options.sft_shapes)
    for mode in options.modes:
        try:
            run_mode(mode, [row for row in rows if row.mode == mode], options, device, results, report, report_profile)
        except Exception as error:  # one mode failing (say, compilation) still leaves the other's figures
            failed = True
            report(f"{mode} (all)", {"error": f"{type(error).__name__}: {error}"})
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
