"""Wrap a finished LimeModel for training, in one place and one order.

    1. activation checkpointing   (model.activation_checkpointing = True: each block is
                                   recomputed in the backward pass; the model implements it)
    2. torch.compile              (per block, in place, so state-dict keys stay unchanged)
    3. DeepSpeed                  (ZeRO stage 1: fp32 master weights and AdamW state sharded
                                   over data-parallel ranks; bf16 weights when bf16 is on)

With bf16, DeepSpeed (0.19) picks its ZeRO-1 optimizer (DeepSpeedZeroOptimizer): gradients accumulate in the
bf16 .grad of each weight over a step's micro-batches and are flattened into one fp32 partition per parameter
group at the step, where clipping and the fused AdamW run on flat tensors; no per-parameter hook runs in the
backward (stage 1 without overlap_comm). Setting data_types.grad_accum_dtype to fp32 would pick BF16_Optimizer
instead: an fp32 add per parameter per micro-batch and per-parameter norm and clip kernels. The synchronisations
left in a step are DeepSpeed's own NaN/inf check (it must read the result to skip a step); its throughput timer
is switched off here, and train_step adds none (it reads nothing back).

The model never knows it is wrapped. The optimizer is a torch AdamW handed to
deepspeed.initialize: `fused=True` on CUDA (one kernel per parameter group, no JIT build),
the plain implementation on CPU. Naming an optimizer in the DeepSpeed config instead would
JIT-compile DeepSpeed's fused_adam, which takes 80 s on a CPU and needs nvcc on every node.

Weight decay: on every weight matrix and on the token embedding (which is also the tied
output head); never on RMSNorm weights or biases (LIME has none). This is what the card
says ("weight decay on non-norm/non-bias params") and what Megatron-LM and nanoGPT do: the
embedding is a matrix the output head multiplies with, so it is regularised like the others.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from megatron_lime.files import read_json
from megatron_lime.model import LimeModel
from megatron_lime.training.config import TrainArgs


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (decayed) and 1-D tensors, i.e. norm weights and biases (not decayed)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def use_bf16(args: TrainArgs, device: torch.device) -> bool:
    """--bf16 / --no-bf16 when given; otherwise bf16 on GPUs that support it and fp32 on CPU."""
    if args.training.bf16 is not None:
        return args.training.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def build_deepspeed_config(args: TrainArgs, data_parallel_size: int, bf16: bool,
                           base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of this run: batch sizes, clipping, precision and ZeRO stage from the flags.

    `base` (the --deepspeed-config JSON) contributes every other section (bucket sizes,
    communication settings, ...). It may not contain an optimizer or scheduler (ours are
    set by the loop) nor batch sizes that disagree with the flags.
    """
    training = args.training
    gas = training.gradient_accumulation_steps(data_parallel_size)
    config = copy.deepcopy(base or {})
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"the DeepSpeed config may not set {key!r}: the optimizer is AdamW from the "
                             f"--adam-* / --weight-decay flags and the LR schedule comes from the --lr-* flags")
    wanted = {"train_batch_size": training.global_batch_size,
              "train_micro_batch_size_per_gpu": training.micro_batch_size,
              "gradient_accumulation_steps": gas}
    for key, value in wanted.items():
        if key in config and config[key] not in (value, "auto"):
            raise ValueError(f"the DeepSpeed config sets {key}={config[key]} but the flags give {value}: "
                             f"remove it from the JSON (batch sizes come from --micro-batch-size/--global-batch-size)")
    config.update(wanted)
    config["gradient_clipping"] = training.clip_grad
    # check_grad_overflow: a NaN/inf gradient norm skips the step instead of corrupting AdamW's state.
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16, "check_grad_overflow": True}
    config.pop("fp16", None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = training.zero_stage
    if args.checkpoint.universal_checkpoint:  # optimizer state re-partitioned for this data-parallel size
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    config.setdefault("zero_allow_untested_optimizer", True)  # a torch AdamW is what we pass
    config.setdefault("steps_per_print", 2**31 - 1)  # the loop logs; keep DeepSpeed quiet
    config.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on by default and synchronises the device at every forward and every step
    # (its "synchronized" default): off, so nothing waits for the GPU on its account; the loop times its windows.
    config.setdefault("timers", {"throughput": {"enabled": False, "synchronized": False}})
    return config


def build_optimizer(model: nn.Module, args: TrainArgs, device: torch.device) -> torch.optim.Optimizer:
    opt = args.optimizer
    return torch.optim.AdamW(parameter_groups(model, opt.weight_decay), lr=opt.lr,
                             betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                             fused=device.type == "cuda")


def wrap_model(model: LimeModel, args: TrainArgs, device: torch.device, data_parallel_size: int):
    """Apply activation checkpointing, torch.compile and DeepSpeed (in that order).

    Returns (engine, ds_config). The engine owns the optimizer; the LR is set by the loop.
    """
    import deepspeed

    if args.training.recompute_activations:
        model.activation_checkpointing = True
    if args.training.torch_compile:
        for block in model.layers:
            block.compile()  # in place: parameter names (and checkpoints) stay as they were
    bf16 = use_bf16(args, device)
    base = read_json(args.training.deepspeed_config) if args.training.deepspeed_config else None
    ds_config = build_deepspeed_config(args, data_parallel_size, bf16, base)
    optimizer = build_optimizer(model, args, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config
