"""The peer: what a user writes in 30 lines, a plain PyTorch loop over transformers' GPT-2 with LIME's dims.

    python benchmarks/bench_gpu_peer.py --json peer.json --shapes 16x4 --modes compile eager  # as gpu_check/ runs it
    python benchmarks/bench_gpu_peer.py --shapes 32x2 --modes compile
    python benchmarks/bench_gpu_peer.py --dry-run                 # the same code at tiny sizes, on the CPU too

The model: GPT2LMHeadModel(GPT2Config(vocab_size, n_positions=seq, n_embd=d, n_layer=L, n_head=H,
n_inner=ffn, activation_function="silu", every dropout 0, tied head)), attention "sdpa", with the dims of the
--model preset (lime-1b: 50,000 x 1,536, 32 layers, 24 heads, 6,144; it has biases, LayerNorm and learned
positions, 984M parameters). fp32 weights on the GPU; each micro-batch runs forward and loss under
torch.autocast(bf16) with labels = inputs (the model shifts them), backward of loss / micro-batches; then
clip_grad_norm_(1.0), torch.optim.AdamW(fused=True), zero_grad(set_to_none=True). "compile" is torch.compile(model)
with static shapes, as ours (a user's run has one micro-batch size, so one static graph; with several rows each
micro-batch size compiles its own graph instead of torch's default turning the batch dimension dynamic).

Every mode runs in this one process, in the order of --modes, on one model and one optimizer (torch.compile(model)
shares the model's weights; the peer has no engine to free, unlike ours): gpu_check.sh runs compile first, so its
compilation overlaps the build of our extension, and --wait-while holds each row's timed steps until that build
has ended (after the row's warm-up), so nothing is timed beside the compiler.

Rows, timing, tokens/s, TFLOP/s and MFU are those of bench_gpu_train.py (bench_common): the same shapes
(MICROxSTEPS), the same step timer, and FLOPs per token of LIME's 6N + 12 L d s for both, so the two tables
compare time for the same work. A row that does not fit in memory says so and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

import torch

from bench_common import (DEFAULT_SHAPES, MODES, Row, format_row, parse_shape, pretraining_batch, rows_for,
                          throughput, timed_steps)
from megatron_lime.config import PRESETS, LimeConfig
from megatron_lime.files import write_json

DRY_RUN = {"model": "lime-tiny", "seq_length": 64, "shapes": ["2x2"], "warmup": 1, "steps": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lime-1b", choices=list(PRESETS),
                        help="whose dims GPT-2 takes (default lime-1b)")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help=f"rows as MICROxSTEPS, as bench_gpu_train.py (default {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager and/or compile, run in this order")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (compilation included)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="datasheet dense bf16 peak (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write the results here (rewritten after every row)")
    parser.add_argument("--wait-while", default=None, metavar="PATH",
                        help="after each row's warm-up, wait while this file exists before timing (gpu_check.sh: "
                             "its build is running)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (lime-tiny's dims, seq 64, shape 2x2), on the CPU when there is no GPU")
    options = parser.parse_args(argv)
    if options.dry_run:
        for name, value in DRY_RUN.items():
            setattr(options, name, value)
    try:
        for shape in options.shapes:
            parse_shape(shape)
    except ValueError as error:
        parser.error(str(error))
    if options.steps <= 0 or options.warmup < 0:
        parser.error("--steps must be positive and --warmup non-negative")
    return options


def build_peer(config: LimeConfig, seq: int, device: torch.device):
    """transformers' GPT-2 with LIME's dims, fp32, sdpa attention, tied head, silu, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(vocab_size=config.vocab_size, n_positions=seq, n_embd=config.hidden_size,
                      n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
                      activation_function="silu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(gpt2, attn_implementation="sdpa").to(device)


class Peer:
    """The peer's model and optimizer, shared by its modes; forward(mode) is the model or torch.compile(model)."""

    def __init__(self, config: LimeConfig, options: argparse.Namespace, device: torch.device) -> None:
        self.model = build_peer(config, options.seq_length, device)
        self.model.train()
        self.parameters = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.lr, fused=device.type == "cuda")
        self.compiled = None

    def forward(self, mode: str):
        if mode == "eager":
            return self.model
        if self.compiled is None:
            self.compiled = torch.compile(self.model)
        return self.compiled


def run_mode(mode: str, rows: list[Row], options: argparse.Namespace, device: torch.device, results: dict[str, Any],
             report, peer: Peer) -> None:
    config = LimeConfig.from_name(options.model)
    results["peer_parameters"] = sum(p.numel() for p in peer.parameters)
    forward, parameters, optimizer = peer.forward(mode), peer.parameters, peer.optimizer
    flops_per_token = config.flops_per_token(options.seq_length)
    generator = torch.Generator().manual_seed(0)
    for row in rows:
        inputs = [pretraining_batch(config.vocab_size, row.micro_batch, options.seq_length, device,
                                    generator)["input_ids"] for _ in range(row.accumulation)]
        losses: list[torch.Tensor] = []

        def step() -> None:  # the plain loop
            for input_ids in inputs:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = forward(input_ids=input_ids, labels=input_ids).loss / len(inputs)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach() * len(inputs))

        timing = timed_steps(step, options.warmup, options.steps, device, options.wait_while)
        if "error" in timing:
            report(row.name, {**row.fields, **timing})
            del inputs, losses
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        peak = results["datasheet_peak_tflops"]
        figures = throughput(row, options.seq_length, timing["seconds"], flops_per_token, peak, device)
        figures.update(first_loss=losses[0].item(), last_loss=losses[-1].item(),
                       wall_seconds_with_warmup=timing["wall_seconds_with_warmup"], waited_s=timing["waited_s"])
        report(row.name, figures)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not options.dry_run:
        print("bench_gpu_peer: no CUDA GPU (torch.cuda.is_available() is False): this benchmark needs one "
              "(--dry-run runs its code at tiny sizes on the CPU)", file=sys.stderr)
        return 2
    from megatron_lime.training.metrics import peak_tflops_for

    # Static shapes, as bench_gpu_train.py: each micro-batch size compiles its own graph.
    torch._dynamo.config.automatic_dynamic_shapes = False
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    import transformers

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "torch": torch.__version__,
        "transformers": transformers.__version__, "model": f"GPT2LMHeadModel with {options.model}'s dims",
        "seq_length": options.seq_length,
        "flops_per_token": LimeConfig.from_name(options.model).flops_per_token(options.seq_length),
        "datasheet_peak_tflops": peak_tflops_for(device, options.peak_tflops),
        "precision": "fp32 weights + torch.autocast(bf16) around forward and loss",
        "warmup_steps": options.warmup, "timed_steps": options.steps, "dry_run": options.dry_run, "runs": {},
    }
    print(f"{results['gpu']}; torch {results['torch']}, transformers {results['transformers']}; peer: "
          f"{results['model']}, seq {options.seq_length}, fp32 weights + autocast bf16, fused AdamW, clip 1.0; "
          f"{options.warmup} warm-up + {options.steps} timed steps per row", flush=True)

    def report(name: str, row: dict[str, Any]) -> None:
        results["runs"][name] = row
        if options.json:
            write_json(options.json, results)
        print(format_row(name, row), flush=True)

    failed = False
    rows = rows_for(["pretrain"], options.shapes, options.modes)
    peer = Peer(LimeConfig.from_name(options.model), options, device)
    for mode in options.modes:
        try:
            run_mode(mode, [row for row in rows if row.mode == mode], options, device, results, report, peer)
        except Exception as error:  # one mode failing still leaves the other's figures
            failed = True
            report(f"{mode} (all)", {"error": f"{type(error).__name__}: {error}"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
