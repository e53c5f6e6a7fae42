"""model.linear: the Linear layers' fused weight-gradient accumulation gives autograd's gradients, with one GEMM
per micro-batch writing the weight gradient and no separate add (nor, under autocast, a cast to fp32)."""

from __future__ import annotations

import pytest
import torch

from megatron_lime.model.linear import Linear
from op_log import OpLog


def accumulate(layer: Linear, inputs: list[torch.Tensor], autocast: bool) -> list[list[str]]:
    """Forward and backward of each micro-batch into the same .grad; the ops that produced weight-shaped tensors
    in each backward."""
    per_backward = []
    for x in inputs:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        with OpLog() as log:
            (y.float() ** 2).sum().backward()
        per_backward.append([op for op, shape in log.ops if shape == tuple(layer.weight.shape)
                             and op not in ("aten.t", "aten.detach", "aten.view")])
    return per_backward


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_fused_weight_grad_accumulation_equals_autograd(autocast):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 7, 24, generator=g, requires_grad=True) for _ in range(3)]
    plain, fused = Linear(24, 40), Linear(24, 40)
    fused.load_state_dict(plain.state_dict())
    fused.accumulate_weight_grad = True
    plain_ops = accumulate(plain, inputs, autocast)
    grads_x = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    fused_ops = accumulate(fused, inputs, autocast)
    assert fused.weight.grad.dtype == torch.float32
    tolerance = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, **tolerance)
    for x, want in zip(inputs, grads_x):
        torch.testing.assert_close(x.grad, want, **tolerance)
    # autograd: a GEMM, then (after the first micro-batch) an add into .grad, and under autocast a cast to fp32
    assert plain_ops[1] == (["aten.mm", "aten._to_copy", "aten.add_"] if autocast else ["aten.mm", "aten.add_"])
    # fused: the first micro-batch's GEMM writes .grad (fp32 straight from the GEMM where the device can, a cast
    # of its product here on the CPU), each later one adds into it in its epilogue (or, on the CPU under autocast,
    # adds its bf16 product): never a separate cast of a second gradient tensor
    assert fused_ops[0] == (["aten.mm", "aten._to_copy"] if autocast else ["aten.mm"])
    assert fused_ops[1] == fused_ops[2] == (["aten.mm", "aten.add_"] if autocast else ["aten.addmm_"])


def test_without_grad_or_switched_off_it_is_f_linear():
    layer = Linear(8, 4)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())
    layer.accumulate_weight_grad = True
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.t())
    assert set(layer.state_dict()) == {"weight"}


def test_the_autocast_copy_of_a_weight_is_kept_until_the_weights_change():
    """Under autocast, with a cast cache, the weight is cast once for all micro-batches of a step, and again
    after weights_changed() (an optimizer step): never a stale copy."""
    from megatron_lime.model.linear import weights_changed

    layer = Linear(24, 40)
    layer.accumulate_weight_grad, layer.cast_cache = True, {}
    x = torch.randn(3, 24, requires_grad=True)

    def forward_casts() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
            y = layer(x)
        y.float().sum().backward()
        return sum(op == "aten._to_copy" and shape == tuple(layer.weight.shape) for op, shape in log.ops)

    assert [forward_casts(), forward_casts(), forward_casts()] == [1, 0, 0]
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step
    weights_changed()
    assert forward_casts() == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_with_activation_checkpointing_the_model_gets_autograds_gradients():
    """Recomputed blocks (--recompute-activations) run the fused layers' backward once per micro-batch."""
    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel

    torch.manual_seed(0)
    plain = LimeModel(LimeConfig.from_name("lime-tiny"))
    fused = LimeModel(LimeConfig.from_name("lime-tiny"))
    fused.load_state_dict(plain.state_dict())
    fused.activation_checkpointing = True
    for module in fused.modules():
        if isinstance(module, Linear):
            module.accumulate_weight_grad = True
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two micro-batches into the same .grad
        tokens = torch.randint(0, 512, (2, 17), generator=g)
        for model in (plain, fused):
            model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    for (name, want), got in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_wrap_switches_the_fused_accumulation_on_only_where_nothing_hooks_gradient_accumulation():
    """A DeepSpeed optimizer with gradient hooks (contiguous_gradients or overlap_comm on, ZeRO-2) or a compiled model
    keeps autograd's accumulation: the fused path would bypass the hooks."""
    from types import SimpleNamespace

    from megatron_lime.config import LimeConfig
    from megatron_lime.model import LimeModel
    from megatron_lime.training.wrap import accumulate_weight_grads_in_gemms

    def switched(optimizer, compiled: bool = False) -> set[bool]:
        model = LimeModel(LimeConfig.from_name("lime-tiny"))
        accumulate_weight_grads_in_gemms(model, optimizer, compiled)
        return {m.accumulate_weight_grad for m in model.modules() if isinstance(m, Linear)}

    inner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    zero1 = SimpleNamespace(_grad_acc_hooks=[], partition_gradients=False, optimizer=inner)
    assert switched(zero1) == {True}
    assert switched(SimpleNamespace(_grad_acc_hooks=[object()], partition_gradients=False, optimizer=inner)) == {False}
    assert switched(SimpleNamespace(_grad_acc_hooks=[], partition_gradients=True, optimizer=inner)) == {False}
    assert switched(SimpleNamespace(optimizer=inner)) == {False}  # not DeepSpeed's ZeRO optimizer
    assert switched(zero1, compiled=True) == {False}
