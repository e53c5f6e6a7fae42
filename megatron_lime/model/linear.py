"""Bias-free Linear layers whose weight gradient is accumulated by its own GEMM, and the GEMM helpers behind it.

With gradient accumulation, autograd computes each micro-batch's weight gradient into a new tensor and then adds
it into `.grad` (AccumulateGrad): per micro-batch after the first, a read of the new gradient and a read and write
of `.grad`, 6 bytes per parameter with bf16 gradients; under autocast (fp32 weights, bf16 GEMMs) also the cast of
the bf16 gradient to fp32 and 12 bytes for the fp32 add, about 18 bytes per parameter. `linear` with
`accumulate_weight_grad=True` instead makes the weight-gradient GEMM add into `.grad` itself (its epilogue reads
and writes `.grad` once, in fp32 where the GEMM can write fp32 from bf16 inputs), as Megatron-LM's
gradient-accumulation fusion does: no separate add, no cast, no second tensor.

Under autocast it can also keep the weight's bf16 copy from one micro-batch to the next (`cast_cache`): autocast
casts every weight again in every forward (6 bytes per parameter per micro-batch); kept, once per optimizer
step, until `weights_changed()` (training.wrap makes it a step hook of the optimizer).

It bypasses autograd's AccumulateGrad, so a hook registered on a weight's gradient accumulation never fires:
training.wrap switches it on only for DeepSpeed configurations that register none (ZeRO stage 0 or 1 without
overlap_comm and contiguous_gradients), never under torch.compile (the backward mutates `.grad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_FP32_OUT_GEMM: dict[str, bool] = {}


def fp32_out_gemm_works(device: torch.device) -> bool:
    """Whether mm/addmm(bf16, bf16, out_dtype=float32) run here (CUDA in torch >= 2.8), tried once per device type."""
    if device.type not in _FP32_OUT_GEMM:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(8, 16, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(16, 4, device=device, generator=g).to(torch.bfloat16)
            c = torch.ones(8, 4, device=device)
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            product = torch.mm(a, b, out_dtype=torch.float32)
            exact = a.float() @ b.float()
            works = (product.dtype == torch.float32 and torch.allclose(product, exact, rtol=1e-3, atol=1e-3)
                     and torch.allclose(c, 1.0 + exact, rtol=1e-3, atol=1e-3))
        except (RuntimeError, NotImplementedError, TypeError):
            works = False
        _FP32_OUT_GEMM[device.type] = works
    return _FP32_OUT_GEMM[device.type]


def product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b (2-D) in `dtype` (the GEMM accumulates in fp32 whatever its inputs; the result is rounded once)."""
    if dtype == a.dtype:
        return a @ b
    if dtype == torch.float32 and fp32_out_gemm_works(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)  # the GEMM writes fp32 itself
    return (a @ b).to(dtype)


def accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (2-D), with one pass over `out` (the GEMM's epilogue) where the dtypes allow it."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif out.dtype == torch.float32 and fp32_out_gemm_works(out.device):
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:  # the product in the inputs' dtype, added into `out` (promoted by add_)
        out.add_(a @ b)


class _LinearAccumulatingWeightGrad(torch.autograd.Function):
    """y = x @ W^T; the backward returns dx and adds dy^T @ x into weight.grad itself (returns no weight gradient)."""

    @staticmethod
    def forward(ctx, x, compute_weight, weight):
        # x (..., in) and compute_weight (out, in) in the compute dtype; weight: the parameter whose .grad accumulates
        ctx.save_for_backward(x, compute_weight)
        ctx.weight = weight
        return F.linear(x, compute_weight)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        x, compute_weight = ctx.saved_tensors
        weight = ctx.weight
        grad_out = grad_out.to(compute_weight.dtype)
        grad_x = grad_out @ compute_weight if ctx.needs_input_grad[0] else None  # (..., in)
        dy, xs = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])  # (n, out), (n, in)
        if weight.grad is None:  # the first micro-batch: the GEMM's result is the gradient, in the weight's dtype
            weight.grad = product(dy.t(), xs, weight.dtype)  # (out, in)
        else:
            accumulate_product(weight.grad, dy.t(), xs)
        return grad_x, None, None


_WEIGHTS_GENERATION = [0]


def weights_changed() -> None:
    """Say that weights were updated (an optimizer step): every Linear's kept cast copy is stale from now on.

    training.wrap registers it as a step hook of the optimizer when it switches the cast cache on."""
    _WEIGHTS_GENERATION[0] += 1


def linear(x: torch.Tensor, weight: torch.Tensor, accumulate_weight_grad: bool = False,
           cast_cache: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight) (no bias); with accumulate_weight_grad, the backward's weight-gradient GEMM adds into
    weight.grad itself (see the module). Under autocast both run in autocast's dtype, as F.linear would.

    cast_cache: where the weight's autocast-dtype copy is kept between the micro-batches of an optimizer step
    (autocast casts it again in every forward: 6 bytes per parameter each time), until weights_changed().
    x: (..., in); weight: (out, in). Returns (..., out).
    """
    if not (accumulate_weight_grad and weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    if dtype == weight.dtype:
        compute_weight = weight
    else:
        key = (_WEIGHTS_GENERATION[0], weight.data_ptr(), dtype)
        compute_weight = cast_cache.get(key) if cast_cache is not None else None
        if compute_weight is None:
            with torch.no_grad():
                compute_weight = weight.to(dtype)
            if cast_cache is not None:
                cast_cache.clear()
                cast_cache[key] = compute_weight
    with torch.autocast(device_type, enabled=False):
        return _LinearAccumulatingWeightGrad.apply(x.to(dtype), compute_weight, weight)


class Linear(nn.Linear):
    """nn.Linear without bias whose weight gradient the backward's GEMM accumulates when `accumulate_weight_grad`
    is on (switched on by training.wrap, never by the model); state-dict keys and initialisation as nn.Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.accumulate_weight_grad = False
        self.cast_cache: dict | None = None  # {} keeps the autocast copy of the weight until weights_changed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.accumulate_weight_grad, self.cast_cache)
