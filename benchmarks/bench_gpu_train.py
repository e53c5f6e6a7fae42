"""lime-1b training throughput on one GPU through the real training step: tokens/s, TFLOP/s, MFU, memory, a profile.

    python benchmarks/bench_gpu_train.py --json train.json --shapes 16x4 --batch-kinds pretrain  # as gpu_check/ runs it
    python benchmarks/bench_gpu_train.py --shapes 32x2 --modes compile --precisions autocast --batch-kinds pretrain
    python benchmarks/bench_gpu_train.py --dry-run            # every code path at tiny sizes, on the CPU too

For each precision (--precisions: bf16, DeepSpeed's bf16 mode, bf16 weights with an fp32 master copy; autocast,
DeepSpeed's torch_autocast, fp32 weights and bf16 compute, the model card's mixed fp32/bf16) and each mode (eager,
compile), in a process of its own (so no memory of one counts in another's peak), one model is built and wrapped by
the training code itself (training.wrap.wrap_model: torch.compile of the blocks for "compile", DeepSpeed ZeRO-1 with
the config the trainer builds from the recipe's DeepSpeed file, examples/ds_config_zero1_bf16.json, as
examples/pretrain_lime_1b.sh passes it (--deepspeed-config), torch's fused AdamW, the kernel choice plan made before
step 1, whose lines are printed and kept in the JSON), and every row runs training.pretrain.train_step, the loop's
own step: token counting, all-reduces, LR, clipping, skip check.
A row is a batch kind and a shape MICROxSTEPS: STEPS micro-batches of MICRO sequences per optimizer step
(DeepSpeed's gradient accumulation; the engine's accumulation count is set per row). The default shapes are 64
sequences per step, the recipe's global batch of 512 on 8 GPUs, as 16x4 (the recipe's) and 32x2. Each row runs
--warmup steps, then times --steps steps (the device drained before and after); a row that does not fit in
memory is reported as OOM and the next one runs. One row per process (--profile-shape, pretraining; 'none' by
default) is then run under torch.profiler for --profile-steps steps: the top 20 CUDA kernels, the share of the
step the GPU is idle and the host syncs, as markdown (--profile-md).

Tokens/s counts every position of every sequence; TFLOP/s counts LimeConfig.flops_per_token (6N + 12 L d s, the
whole causal sequence as Megatron counts it, packed batches too); MFU divides by the datasheet's dense bf16
peak (training.metrics, or --peak-tflops). A bf16 matmul timed in the same process says what this GPU's
matrix units deliver today. benchmarks/bench_gpu_peer.py times a plain PyTorch loop over transformers' GPT-2
with the same dims on the same rows; gpu_check/gpu_check.sh prints the two side by side.

--dry-run runs all of it at tiny sizes (lime-tiny, seq 64, on a CPU: both precisions as DeepSpeed runs them there)
so the test suite proves the script.
Without a GPU and without --dry-run it says so and exits 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Any

import torch

from bench_common import (BATCH_KINDS, DEFAULT_SHAPES, MODES, PRECISIONS, Row, format_row, make_batch,
                          is_out_of_memory, matmul_tflops, parse_shape, profile_steps, profile_table, rows_for,
                          run_apart, throughput, timed_steps)
from megatron_lime.config import PRESETS, LimeConfig
from megatron_lime.files import write_json, write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DEEPSPEED_CONFIG = os.path.join(REPO, "examples", "ds_config_zero1_bf16.json")
DRY_RUN = {"model": "lime-tiny", "seq_length": 64, "shapes": ["2x2"], "sft_shapes": ["2x2"], "warmup": 1,
           "steps": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-1b", choices=list(PRESETS), help="model preset (default lime-1b)")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="pretraining rows as MICROxSTEPS: micro-batch size x micro-batches per optimizer step "
                             f"(default {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--sft-shapes", nargs="+", default=["16x4"],
                        help="the packed SFT rows, as --shapes (default 16x4)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="eager and/or compile")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["bf16", "autocast"],
                        help="training's --precision, one process each (default bf16 autocast)")
    parser.add_argument("--deepspeed-config", default=RECIPE_DEEPSPEED_CONFIG,
                        help="the DeepSpeed JSON passed to training (default: the recipe's, "
                             "examples/ds_config_zero1_bf16.json; 'none' for none)")
    parser.add_argument("--batch-kinds", nargs="+", choices=BATCH_KINDS, default=list(BATCH_KINDS),
                        help="random pretraining tokens and/or packed SFT rows")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation included)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--profile-shape", default="none",
                        help="the pretraining row profiled in each process (default 'none': no profile)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler")
    parser.add_argument("--profile-md", default=None, help="write the profile tables here (markdown)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="the bf16 matmul that measures this GPU's rate")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="datasheet dense bf16 peak (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every row)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (lime-tiny, seq 64, shape 2x2, 1 + 1 steps; a profile of 2x2 if one was asked "
                             "for), on the CPU when there is no GPU")
    options = parser.parse_args(argv)
    if options.dry_run:
        options.model, options.seq_length = DRY_RUN["model"], DRY_RUN["seq_length"]
        options.shapes, options.sft_shapes = DRY_RUN["shapes"], DRY_RUN["sft_shapes"]
        options.warmup, options.steps = DRY_RUN["warmup"], DRY_RUN["steps"]
        if options.profile_shape != "none":
            options.profile_shape, options.profile_steps = DRY_RUN["shapes"][0], 1
    if options.deepspeed_config == "none":
        options.deepspeed_config = None
    elif not os.path.isfile(options.deepspeed_config):
        parser.error(f"--deepspeed-config {options.deepspeed_config}: no such file")
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


class KernelChoiceLines(logging.Handler):
    """Keeps the kernel choice plan's log lines (megatron_lime.kernels: "kernel choice: ...") as they are printed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith("megatron_lime.kernels"):
            self.lines.append(message)


def run_mode(mode: str, precision: str, rows: list[Row], options: argparse.Namespace, device: torch.device,
             results: dict[str, Any], report, report_profile) -> None:
    """One engine for the precision and mode; every row through train_step; the profiled row under torch.profiler."""
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.pretrain import build_model, train_step
    from megatron_lime.training.wrap import wrap_model

    largest = max(row.micro_batch for row in rows)
    flags = ["--model", options.model, "--seq-length", str(options.seq_length), "--train-iters", "1000000",
             "--micro-batch-size", str(largest), "--global-batch-size", str(largest), "--precision", precision,
             "--zero-stage", "1", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "0"]
    if options.deepspeed_config:
        flags += ["--deepspeed-config", options.deepspeed_config]
    if mode == "compile":
        flags.append("--torch-compile")
    args = parse_training_args(flags)
    config: LimeConfig = args.model
    choices = KernelChoiceLines()
    logging.getLogger("megatron_lime").addHandler(choices)
    try:
        engine, ds_config = wrap_model(build_model(config, args.training.seed, device), args, device, 1)
    finally:
        logging.getLogger("megatron_lime").removeHandler(choices)
    results["processes"][f"{precision} {mode}"] = {
        "deepspeed_config": ds_config, "kernel_choices": choices.lines,
        "parameter_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()})}
    print(f"{precision} {mode}: parameters {', '.join(results['processes'][f'{precision} {mode}']['parameter_dtypes'])}"
          f"; DeepSpeed bf16 {ds_config.get('bf16', {}).get('enabled')}, torch_autocast "
          f"{ds_config.get('torch_autocast', {}).get('enabled')}, overlap_comm "
          f"{ds_config.get('zero_optimization', {}).get('overlap_comm')}; kernel choices: "
          f"{len(choices.lines)} line(s) above", flush=True)
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
            report(row.name, {**row.fields, **timing})
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
    if len(options.modes) * len(options.precisions) > 1:  # each one's memory in a process of its own
        groups = [(f"{precision} {mode}", ["--precisions", precision, "--modes", mode])
                  for precision in options.precisions for mode in options.modes]
        return run_apart(__file__, sys.argv[1:] if argv is None else argv, groups, options.json, options.profile_md)
    if not torch.cuda.is_available() and not options.dry_run:
        print("bench_gpu_train: no CUDA GPU (torch.cuda.is_available() is False): this benchmark needs one "
              "(--dry-run runs its code at tiny sizes on the CPU)", file=sys.stderr)
        return 2
    from megatron_lime import kernels
    from megatron_lime.training.metrics import peak_tflops_for
    from megatron_lime.training.distributed import init_distributed

    # The kernel choice plan (wrap_model) logs its choices at INFO: print them.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("megatron_lime").setLevel(logging.INFO)

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
        "kernels": kernels.backend(device), "deepspeed_config_file": options.deepspeed_config,
        "matmul_size": options.matmul_size,
        "matmul_tflops": matmul_tflops(options.matmul_size, device) if cuda else None,
        "warmup_steps": options.warmup, "timed_steps": options.steps, "dry_run": options.dry_run,
        "runs": {}, "profiles": {}, "processes": {},
    }
    matmul = f"{results['matmul_tflops']:.0f} TFLOP/s" if cuda else "n/a"
    print(f"{results['gpu']}; torch {results['torch']} (CUDA {results['cuda']}); {options.model} "
          f"({results['parameters'] / 1e6:.0f}M parameters), seq {options.seq_length}, DeepSpeed ZeRO-1 "
          f"--precision {' / '.join(options.precisions)}, --deepspeed-config {options.deepspeed_config}; kernels "
          f"{results['kernels']}; bf16 {options.matmul_size}^3 matmul: {matmul}; datasheet peak: "
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
    rows = rows_for(options.batch_kinds, options.shapes, options.modes, options.sft_shapes, options.precisions)
    for precision in options.precisions:
        for mode in options.modes:
            mine = [row for row in rows if row.mode == mode and row.precision == precision]
            try:
                run_mode(mode, precision, mine, options, device, results, report, report_profile)
            except Exception as error:  # one failing (say, compilation, or no memory for the engine) leaves the rest
                failed = True
                report(f"{precision} {mode} (all)", {"mode": mode, "precision": precision,
                                                     "error": f"{type(error).__name__}: {error}",
                                                     "oom": is_out_of_memory(error)})
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
