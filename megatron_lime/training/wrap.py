"""Wrap a finished LimeModel for training, in one place and one order.

    1. activation checkpointing   (model.activation_checkpointing = True: each block is
                                   recomputed in the backward pass; the model implements it)
    2. torch.compile              (per block, in place, so state-dict keys stay unchanged)
    3. DeepSpeed                  (ZeRO stage 1: fp32 master weights and AdamW state sharded
                                   over data-parallel ranks; the precision of --precision)
    4. DeepSpeed's step, tuned    (one multi-tensor gradient norm that is also the overflow check; the Linear
                                   layers' weight gradients accumulated by their own GEMMs where nothing hooks
                                   gradient accumulation: fuse_norm_and_overflow_check,
                                   accumulate_weight_grads_in_gemms)
    5. the kernel plan            (ours or PyTorch's RMSNorm/SiLU at each shape the run calls, chosen once
                                   here, before step 1, from one recording forward; kernels.plan_kernel_choices)

Precision (--precision): bf16 is DeepSpeed's bf16 mode (bf16 weights and gradients, fp32 master copy and AdamW
state in the ZeRO optimizer); autocast is DeepSpeed's torch_autocast (fp32 weights, the forward under
torch.autocast(bf16), Linear gradients reduced in bf16): the model card's "mixed fp32/bf16"; fp32 for CPUs.

With bf16, DeepSpeed (0.19) picks its ZeRO-1 optimizer (DeepSpeedZeroOptimizer): gradients accumulate in the
bf16 .grad of each weight over a step's micro-batches and are flattened into one fp32 partition per parameter
group at the step, where clipping and the fused AdamW run on flat tensors; no per-parameter hook runs in the
backward (stage 1 without overlap_comm). Setting data_types.grad_accum_dtype to fp32 would pick BF16_Optimizer
instead: an fp32 add per parameter per micro-batch and per-parameter norm and clip kernels. The synchronisations
left in a step are DeepSpeed's own NaN/inf check (it must read the result to skip a step); its throughput timer
is switched off here, and train_step adds none (it reads nothing back).

DeepSpeed's ZeRO step computes the global gradient norm with one fp64 cast and norm per parameter and checks for
NaN/inf with an amax and an amin per gradient: 15 small ops per parameter in bf16 mode (counted on a CPU:
about 2,900 per step for lime-1b's 194 parameters) and an fp64 copy of every gradient.
`fuse_norm_and_overflow_check` replaces both on the engine's optimizer with one multi-tensor norm
(torch._foreach_norm, fp32 accumulation, as torch.nn.utils.clip_grad_norm_) whose non-finite value is the
overflow: the same norm, the same skip, one all-reduce and one host read per step.

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

from megatron_lime import kernels
from megatron_lime.files import read_json
from megatron_lime.model import LimeModel
from megatron_lime.model.linear import Linear, weights_changed
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


def resolve_precision(args: TrainArgs, device: torch.device) -> str:
    """--precision (or --bf16 / --no-bf16) when given; otherwise bf16 on GPUs that support it and fp32 on CPU."""
    if args.training.precision is not None:
        return args.training.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def build_deepspeed_config(args: TrainArgs, data_parallel_size: int, precision: str,
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
    # check_grad_overflow: a NaN/inf gradient norm skips the step instead of corrupting AdamW's state (with fp32
    # weights, autocast's and fp32's, DeepSpeed's ZeRO optimizer skips on a non-finite norm by itself).
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16", "check_grad_overflow": True}
    # autocast: fp32 weights and master state; the forward under torch.autocast(bf16) for the listed modules' matmuls;
    # the Linear layers' gradients are reduced in bf16 (DeepSpeed's comm_dtype), the others in fp32.
    config["torch_autocast"] = {**config.get("torch_autocast", {}), "enabled": precision == "autocast",
                                "dtype": "bfloat16"}
    config.pop("fp16", None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = training.zero_stage
    if training.zero_stage <= 1:
        # DeepSpeed's default (True) only matters to stage 2's gradient partitioning; in stage 1 it registers a hook
        # on every parameter that runs in every micro-batch (and allocates a reduce-bucket-sized buffer per
        # micro-batch), and it rules out the Linear layers' fused weight-gradient accumulation.
        zero.setdefault("contiguous_gradients", False)
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
    precision = resolve_precision(args, device)
    base = read_json(args.training.deepspeed_config) if args.training.deepspeed_config else None
    ds_config = build_deepspeed_config(args, data_parallel_size, precision, base)
    optimizer = build_optimizer(model, args, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    fuse_norm_and_overflow_check(engine.optimizer)
    accumulate_weight_grads_in_gemms(model, engine.optimizer, compiled=args.training.torch_compile)
    plan_kernels(engine, args, device)
    return engine, ds_config


def plan_kernels(engine, args: TrainArgs, device: torch.device) -> dict:
    """Choose ours or PyTorch's fused-op kernels for the run's shapes, before step 1 (kernels.plan_kernel_choices).

    The recording forward is one micro-batch of the run's shape, without autograd, activation checkpointing
    (eval mode) or compilation (the compiled blocks run eagerly): nothing is timed inside it, and the timing
    that follows runs outside any forward. Every rank calls it (the choice is agreed over the ranks).
    """
    micro_batch, seq = args.training.micro_batch_size, args.seq_length
    tokens = torch.zeros(micro_batch, seq, dtype=torch.long, device=device)

    def recording_forward() -> None:
        was_training = engine.module.training
        engine.module.eval()
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                engine(input_ids=tokens, labels=tokens)
        finally:
            engine.module.train(was_training)

    return kernels.plan_kernel_choices(recording_forward, device, compiled=args.training.torch_compile)


def accumulate_weight_grads_in_gemms(model: LimeModel, optimizer, compiled: bool) -> bool:
    """Let the Linear layers' weight-gradient GEMMs add into .grad themselves (model.linear): no AccumulateGrad
    add per micro-batch, no fp32 cast of each bf16 weight gradient under autocast; and, under autocast, keep each
    weight's bf16 copy over a step's micro-batches (cast once per optimizer step, not once per micro-batch).

    Only where nothing hooks a weight's gradient accumulation (the fused path bypasses it): DeepSpeed's ZeRO-1/2
    optimizer without gradient hooks (ZeRO stage 1 with overlap_comm and contiguous_gradients off, as
    build_deepspeed_config sets them unless the JSON asks otherwise), and not under torch.compile (its backward
    mutates .grad). Returns whether it was switched on.
    """
    hooks = getattr(optimizer, "_grad_acc_hooks", None)
    if compiled or hooks is None or len(hooks) or getattr(optimizer, "partition_gradients", True):
        return False
    # The step hook of the torch optimizer inside DeepSpeed's: every update makes the kept casts stale.
    inner = getattr(optimizer, "optimizer", None)
    cache_casts = isinstance(inner, torch.optim.Optimizer)
    if cache_casts:
        inner.register_step_post_hook(lambda *_: weights_changed())
    for module in model.modules():
        if isinstance(module, Linear):
            module.accumulate_weight_grad = True
            module.cast_cache = {} if cache_casts else None
    return True


def fuse_norm_and_overflow_check(optimizer) -> bool:
    """Give DeepSpeed's ZeRO-1/2 optimizer one multi-tensor gradient norm that is also its NaN/inf check.

    DeepSpeed calls check_overflow() (when bf16.check_grad_overflow is on) and then scaled_global_norm() at each
    step; both become the norm below, computed once per step: torch._foreach_norm over the partition's
    gradients, the squares summed and all-reduced over the data-parallel group, a non-finite result being the
    overflow. Returns False, leaving DeepSpeed's own methods, for an optimizer without that interface (another
    DeepSpeed version or optimizer): the run is then only slower.
    """
    needed = ("averaged_gradients", "bit16_groups", "dp_process_group", "check_overflow", "scaled_global_norm",
              "loss_scale", "cpu_offload")
    if not all(hasattr(optimizer, name) for name in needed) or optimizer.cpu_offload:
        return False
    import deepspeed.comm as ds_comm

    cached: dict[str, torch.Tensor] = {}

    def global_norm() -> torch.Tensor:
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in (optimizer.averaged_gradients.get(i) or ())
                 if g is not None and g.numel()]
        if grads:  # each tensor's norm in fp32 (bf16 norms would round the global norm by up to 0.4%)
            squares = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum()
        else:
            squares = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_comm.all_reduce(squares, group=optimizer.dp_process_group)
        return squares.sqrt()

    def check_overflow(partition_gradients: bool = True) -> None:
        cached["norm"] = global_norm()
        optimizer.overflow = not bool(torch.isfinite(cached["norm"]).item())  # the step's one host read

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        if norm_type != 2:
            raise ValueError("only the L2 norm is supported")
        norm = cached.pop("norm", None)
        return global_norm() if norm is None else norm

    optimizer.check_overflow = check_overflow
    optimizer.scaled_global_norm = scaled_global_norm
    return True
