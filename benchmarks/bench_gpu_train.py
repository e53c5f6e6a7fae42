"""lime-1b training throughput on one GPU, through the real training step: tokens/s, TFLOP/s, MFU, memory.

    python benchmarks/bench_gpu_train.py                                   # what gpu_check.sh runs
    python benchmarks/bench_gpu_train.py --model lime-125m --micro-batch-sizes 8 --modes eager
    python benchmarks/bench_gpu_train.py --json results.json               # also write every figure

For each mode (eager, then compile) one model is built and wrapped by the training code itself
(training.wrap.wrap_model: torch.compile of the blocks for "compile", DeepSpeed ZeRO-1, bf16 with
fp32 master weights, torch's fused AdamW), and for each micro-batch size and batch kind it runs
training.pretrain.train_step (token counting, all-reduces, LR, clipping, skip check: the loop's
own step, one micro-batch per step) for --warmup steps, then times --steps steps with CUDA events.

Batch kinds: "pretrain" is random tokens over the whole sequence; "sft-packed" is a packed SFT
batch as the SFT dataset makes them: documents of 16 to 256 tokens (the last cut to fit) with
positions restarting per document, document ids (attention stays inside each document), the
prompt third of each document masked out of the loss, and any tail shorter than 16 tokens padded
as one more document.

TFLOP/s counts LimeConfig.flops_per_token (6N + 12 L d s, the whole causal sequence as Megatron
counts it, also for packed batches), and MFU divides it by the datasheet's dense bf16 peak
(training.metrics, or --peak-tflops) and by a bf16 8192^3 matmul timed in this process: the
second says how far the step is from what this GPU's matrix units deliver today.
Needs a CUDA GPU: on a CPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lime.config import PRESETS, LimeConfig  # noqa: E402
from megatron_lime.files import write_json  # noqa: E402

BATCH_KINDS = ("pretrain", "sft-packed")
MODES = ("eager", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-1b", choices=list(PRESETS))
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-kinds", nargs="+", choices=BATCH_KINDS, default=list(BATCH_KINDS))
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration (compilation included)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--matmul-size", type=int, default=8192, help="the bf16 matmul that measures this GPU's rate")
    parser.add_argument("--peak-tflops", type=float, default=None, help="datasheet dense bf16 peak (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every configuration)")
    return parser.parse_args(argv)


def pretraining_batch(config: LimeConfig, micro_batch: int, seq: int, device: torch.device,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), generator=generator)
    return {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(micro_batch, seq, device=device)}


def packed_sft_batch(config: LimeConfig, micro_batch: int, seq: int, device: torch.device,
                     generator: torch.Generator, shortest: int = 16, longest: int = 256) -> dict[str, torch.Tensor]:
    """Rows of documents of 16-256 tokens (the last one cut to fit), as megatron_lime.data.sft.dataset packs them."""
    input_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    labels = torch.full((micro_batch, seq), -100, dtype=torch.long)
    loss_mask = torch.zeros(micro_batch, seq)
    position_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    document_ids = torch.zeros(micro_batch, seq, dtype=torch.long)
    for row in range(micro_batch):
        cursor, document = 0, 0
        while seq - cursor >= shortest:  # best-fit packing leaves less than the shortest document
            n = min(int(torch.randint(shortest, longest + 1, (1,), generator=generator)), seq - cursor)
            tokens = torch.randint(0, config.vocab_size, (n + 1,), generator=generator)
            span = slice(cursor, cursor + n)
            prompt = n // 3  # targets inside the prompt are not trained
            input_ids[row, span] = tokens[:-1]
            labels[row, cursor + prompt:cursor + n] = tokens[1 + prompt:]
            loss_mask[row, cursor + prompt:cursor + n] = 1.0
            position_ids[row, span] = torch.arange(n)
            document_ids[row, span] = document
            cursor, document = cursor + n, document + 1
        position_ids[row, cursor:] = torch.arange(seq - cursor)  # the padding: one more document
        document_ids[row, cursor:] = document
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
             "document_ids": document_ids}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def matmul_tflops(size: int, device: torch.device, repeats: int = 20) -> float:
    """bf16 size^3 matmul rate on random data (median of `repeats`, CUDA events)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times) / 1e12


def time_steps(step, steps: int) -> float:
    """Seconds per step over `steps` calls (events around the whole run; train_step syncs on its loss anyway)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def run_mode(mode: str, options: argparse.Namespace, results: dict[str, Any], report) -> None:
    from megatron_lime.training.config import parse_training_args
    from megatron_lime.training.pretrain import build_model, init_distributed, train_step
    from megatron_lime.training.wrap import wrap_model

    largest = max(options.micro_batch_sizes)
    flags = ["--model", options.model, "--seq-length", str(options.seq_length), "--train-iters", "1000000",
             "--micro-batch-size", str(largest), "--global-batch-size", str(largest), "--bf16",
             "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "0"]
    if mode == "compile":
        flags.append("--torch-compile")
    args = parse_training_args(flags)
    env = init_distributed()
    device = env.device
    config: LimeConfig = args.model
    engine, _ = wrap_model(build_model(config, args.training.seed, device), args, device, 1)
    engine.train()
    flops_per_token = config.flops_per_token(options.seq_length)
    generator = torch.Generator().manual_seed(0)
    for kind in options.batch_kinds:
        for micro_batch in options.micro_batch_sizes:
            make = pretraining_batch if kind == "pretrain" else packed_sft_batch
            batch = make(config, micro_batch, options.seq_length, device, generator)
            losses: list[float] = []

            def step() -> None:
                # DeepSpeed's engine counts micro-batches against its configured size only for
                # gradient accumulation (1 here), so one engine serves every micro-batch size.
                result = train_step(engine, [batch], args.optimizer.lr, device)
                losses.append(result.loss)

            name = f"{kind} mb{micro_batch} {mode}"
            torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            try:
                for _ in range(options.warmup):
                    step()
                seconds = time_steps(step, options.steps)
            except torch.cuda.OutOfMemoryError as error:
                report(name, {"error": f"out of memory: {str(error).splitlines()[0]}"})
                torch.cuda.empty_cache()
                continue
            tokens_per_second = micro_batch * options.seq_length / seconds
            tflops = tokens_per_second * flops_per_token / 1e12
            peak = results["datasheet_peak_tflops"]
            report(name, {
                "batch": kind, "micro_batch_size": micro_batch, "mode": mode, "seq_length": options.seq_length,
                "ms_per_step": 1e3 * seconds, "tokens_per_second": tokens_per_second, "tflops": tflops,
                "mfu_datasheet": tflops / peak if peak else None,
                "mfu_measured_matmul": tflops / results["matmul_tflops"],
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "trained_tokens_per_step": int(batch["loss_mask"].sum()),
                "first_loss": losses[0], "last_loss": losses[-1],
                "wall_seconds_with_warmup": time.perf_counter() - started,
            })
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_train: no CUDA GPU (torch.cuda.is_available() is False): this benchmark needs one",
              file=sys.stderr)
        return 2
    from megatron_lime.training.metrics import peak_tflops_for

    # Static shapes: each micro-batch size compiles its own graph instead of a slower dynamic one.
    torch._dynamo.config.automatic_dynamic_shapes = False
    device = torch.device("cuda", torch.cuda.current_device())
    config = LimeConfig.from_name(options.model)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "model": options.model, "parameters": config.num_parameters(),
        "flops_per_token": config.flops_per_token(options.seq_length),
        "datasheet_peak_tflops": peak_tflops_for(device, options.peak_tflops),
        "matmul_size": options.matmul_size, "matmul_tflops": matmul_tflops(options.matmul_size, device),
        "warmup_steps": options.warmup, "timed_steps": options.steps, "runs": {},
    }
    print(f"{results['gpu']}; torch {results['torch']} (CUDA {results['cuda']}); {options.model} "
          f"({results['parameters'] / 1e6:.0f}M parameters), seq {options.seq_length}, DeepSpeed ZeRO-1 bf16; "
          f"bf16 {options.matmul_size}^3 matmul: {results['matmul_tflops']:.0f} TFLOP/s; datasheet peak: "
          f"{results['datasheet_peak_tflops'] or 'unknown'} TFLOP/s", flush=True)

    def report(name: str, row: dict[str, Any]) -> None:
        results["runs"][name] = row
        if options.json:
            write_json(options.json, results)
        if "error" in row:
            print(f"  {name:<26} {row['error']}", flush=True)
            return
        datasheet = f"{100 * row['mfu_datasheet']:5.1f}%" if row["mfu_datasheet"] else "  n/a"
        print(f"  {name:<26} {row['ms_per_step']:8.1f} ms/step {row['tokens_per_second']:9.0f} tokens/s "
              f"{row['tflops']:6.1f} TFLOP/s  MFU {datasheet} of datasheet, "
              f"{100 * row['mfu_measured_matmul']:5.1f}% of matmul  peak mem {row['peak_memory_gib']:5.1f} GiB  "
              f"loss {row['first_loss']:.2f} -> {row['last_loss']:.2f}", flush=True)

    failed = False
    for mode in options.modes:
        try:
            run_mode(mode, options, results, report)
        except Exception as error:  # one mode failing (say, compilation) still leaves the other's figures
            failed = True
            report(f"{mode} (all)", {"error": f"{type(error).__name__}: {error}"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
