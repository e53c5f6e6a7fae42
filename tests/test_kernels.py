"""Fused RMSNorm, residual add + RMSNorm and SiLU kernels against their references: outputs, every
gradient, dtypes, odd shapes, gradcheck, input checks, torch.compile without graph breaks, backend
selection (per device, and per shape against PyTorch's own ops with a fake timer), and a lime-tiny
model trained 20 steps with the fused kernels and with the references."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lime import kernels
from megatron_lime.config import LimeConfig
from megatron_lime.kernels import _backend
from megatron_lime.model import LimeModel
from megatron_lime.model.lime import LimeBlock

EPS = 1e-5

# Odd shapes on purpose: hidden sizes that are not multiples of the 8-lane vector width
# (scalar tails), 1-D/2-D/3-D inputs, and ones large enough to be split over threads
# (5 x 123 x 123 and 64 x 1536 exceed the per-thread minimum, so the weight gradient's
# per-thread partial sums are reduced; 4096 rows make the weight gradient a long sum).
RMS_NORM_SHAPES = [(5, 123, 123), (64, 1536), (4096, 40), (7, 64), (3, 5, 17), (2, 1), (129,)]
SILU_SHAPES = [(5, 123, 123), (8, 1536), (3, 7), (1,), (2, 3, 4, 5)]

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Our operator itself (with its registered autograd), whatever the per-shape choice would pick."""
    return torch.ops.lime.rms_norm_fwd(x.contiguous(), weight, eps)[0]


def fused_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    h, y, _ = torch.ops.lime.add_rms_norm_fwd(residual.contiguous(), delta.contiguous(), weight, eps)
    return h, y


def fused_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.lime.silu_fwd(x.contiguous())


@pytest.fixture(autouse=True)
def our_kernels_at_every_shape(monkeypatch):
    """The per-shape choice (CUDA only) forced to our kernels: these tests are about them."""
    monkeypatch.setattr(_backend.CHOICES, "mode", "ours")


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as plain PyTorch writes it, in the input's own dtype (no upcast): the error baseline."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def plain_silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def outputs_and_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """[output, grad of each input] of fn(*inputs) with the given output gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad.detach() for leaf in leaves]


def truth_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a result is judged against: fp64 for fp32 results, fp32 for bf16/fp16 ones."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def assert_within_twice_plain_error(ours, plain, truth, atol: float, what: str) -> None:
    """The kernel's max error vs the truth is at most twice plain PyTorch's (same dtype), plus atol."""
    for index, (o, p, t) in enumerate(zip(ours, plain, truth)):
        assert o.dtype == p.dtype and o.shape == t.shape, (what, index, o.dtype, p.dtype, o.shape, t.shape)
        ours_error = (o.double() - t.double()).abs().max().item()
        plain_error = (p.double() - t.double()).abs().max().item()
        assert ours_error <= 2 * plain_error + atol, (
            f"{what}, result {index} (0 = output, then input grads): kernel error {ours_error:.3g} > "
            f"2 x plain PyTorch error {plain_error:.3g} + {atol}")


def make_rms_inputs(shape, dtype, device="cpu", weight_dtype=None):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=weight_dtype or dtype)
    grad_out = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, weight, grad_out


def check_rms_norm(shape, dtype, device, weight_dtype=None):
    x, weight, grad_out = make_rms_inputs(shape, dtype, device, weight_dtype)
    ours = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
    plain = outputs_and_grads(lambda a, w: plain_rms_norm(a, w, EPS).to(dtype), [x, weight], grad_out)
    high = truth_dtype(dtype)
    truth = outputs_and_grads(lambda a, w: plain_rms_norm(a, w, EPS), [x.to(high), weight.to(high)],
                              grad_out.to(high))
    # The weight gradient sums over every row: its error scales with sqrt(rows).
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_within_twice_plain_error(ours, plain, truth, atol, f"rms_norm {shape} {dtype} on {device}")
    if dtype == torch.float32:
        reference = outputs_and_grads(lambda a, w: kernels.rms_norm_ref(a, w, EPS), [x, weight], grad_out)
        # Output and dx are per-element; dweight sums over rows, where summation order shows.
        for o, r, atol in zip(ours, reference, (1e-5, 1e-5, 1e-4)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=atol)


def check_silu(shape, dtype, device):
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 4).to(device=device, dtype=dtype)
    grad_out = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    ours = outputs_and_grads(fused_silu, [x], grad_out)
    plain = outputs_and_grads(plain_silu, [x], grad_out)
    high = truth_dtype(dtype)
    truth = outputs_and_grads(plain_silu, [x.to(high)], grad_out.to(high))
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert_within_twice_plain_error(ours, plain, truth, atol, f"silu {shape} {dtype} on {device}")
    if dtype == torch.float32:
        reference = outputs_and_grads(kernels.silu_ref, [x], grad_out)
        for o, r in zip(ours, reference):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_cpu_extension_is_built_and_chosen():
    assert _backend.SELECTION.cpu_extension is not None, "megatron_lime._kernels_cpu did not import"
    assert kernels.backend("cpu") == "fused-cpu"
    assert kernels.backend("meta") == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", RMS_NORM_SHAPES, ids=str)
def test_rms_norm_matches_reference_cpu(shape, dtype):
    check_rms_norm(shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=str)
def test_silu_matches_reference_cpu(shape, dtype):
    check_silu(shape, dtype, "cpu")


def check_add_rms_norm(shape, dtype, device, weight_dtype=None):
    """add_rms_norm's two outputs (h, y) and its three gradients against plain PyTorch's error."""
    residual, weight, grad_y = make_rms_inputs(shape, dtype, device, weight_dtype)
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    grad_h = torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def run(fn, inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        h, y = fn(*leaves)
        torch.autograd.backward([h, y], [grad_h.to(h.dtype), grad_y.to(y.dtype)])
        return [h.detach(), y.detach()] + [leaf.grad.detach() for leaf in leaves]

    ours = run(fused_add_rms_norm, [residual, delta, weight])
    plain = run(lambda r, d, w: (r + d, plain_rms_norm(r + d, w, EPS).to(dtype)), [residual, delta, weight])
    high = truth_dtype(dtype)
    truth = run(lambda r, d, w: (r + d, plain_rms_norm(r + d, w, EPS)),
                [residual.to(high), delta.to(high), weight.to(high)])
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_within_twice_plain_error(ours, plain, truth, atol, f"add_rms_norm {shape} {dtype} on {device}")
    # h is the sum rounded once to the storage dtype, as an unfused add stores it: bit for bit.
    assert torch.equal(ours[0], residual + delta)
    torch.testing.assert_close(ours[2], ours[3], rtol=0, atol=0)  # residual and delta: the same gradient
    if dtype == torch.float32:
        reference = run(lambda r, d, w: kernels.add_rms_norm_ref(r, d, w, EPS), [residual, delta, weight])
        for o, r, atol in zip(ours, reference, (0, 1e-5, 1e-5, 1e-5, 1e-4)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", RMS_NORM_SHAPES, ids=str)
def test_add_rms_norm_matches_reference_cpu(shape, dtype):
    check_add_rms_norm(shape, dtype, "cpu")


def test_add_rms_norm_public_function_falls_back_for_mixed_dtypes():
    """A bf16 branch output added to an fp32 residual (autocast's case): PyTorch's promotion, unfused."""
    residual, weight, _ = make_rms_inputs((6, 40), torch.float32, "cpu")
    delta = torch.randn(6, 40).to(torch.bfloat16)
    h, y = kernels.add_rms_norm(residual, delta, weight, EPS)
    expected_h, expected_y = kernels.add_rms_norm_ref(residual, delta, weight, EPS)
    assert h.dtype == y.dtype == torch.float32
    torch.testing.assert_close(h, expected_h, rtol=0, atol=0)
    torch.testing.assert_close(y, expected_y)


def test_rms_norm_bf16_activations_with_fp32_weight():
    """Autocast's case: bf16 x, fp32 master weight -> bf16 output, fp32 weight gradient."""
    check_rms_norm((6, 100), torch.bfloat16, "cpu", weight_dtype=torch.float32)
    x, weight, _ = make_rms_inputs((6, 100), torch.bfloat16, "cpu", torch.float32)
    weight.requires_grad_(True)
    y = kernels.rms_norm(x, weight, EPS)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_public_functions_take_non_contiguous_inputs():
    x = torch.randn(40, 3, 24).transpose(0, 2)  # (24, 3, 40), not contiguous
    weight = torch.randn(40)
    torch.testing.assert_close(kernels.rms_norm(x, weight, EPS), kernels.rms_norm_ref(x, weight, EPS))
    torch.testing.assert_close(kernels.silu(x), kernels.silu_ref(x))


def test_empty_inputs():
    x = torch.empty(0, 16, requires_grad=True)
    weight = torch.ones(16, requires_grad=True)
    y = kernels.rms_norm(x, weight, EPS)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(weight.grad, torch.zeros(16))
    assert kernels.silu(torch.empty(0, 3)).shape == (0, 3)


def test_gradcheck_float64_cpu_kernels():
    x = torch.randn(3, 5, 13, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: fused_rms_norm(a, w), (x, weight))
    assert torch.autograd.gradcheck(fused_silu, (torch.randn(4, 11, dtype=torch.float64, requires_grad=True),))


def check_custom_ops_pass_opcheck(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    torch.library.opcheck(torch.ops.lime.rms_norm_fwd.default, (x, weight, EPS))
    y, rstd = torch.ops.lime.rms_norm_fwd(x, weight, EPS)
    for weight_grad in (True, False):
        torch.library.opcheck(torch.ops.lime.rms_norm_bwd.default, (torch.randn_like(x), x, weight, rstd, weight_grad))
    torch.library.opcheck(torch.ops.lime.add_rms_norm_fwd.default, (x, torch.randn_like(x), weight, EPS))
    torch.library.opcheck(torch.ops.lime.rms_norm_bwd.default,
                          (torch.randn_like(x), x, weight, rstd, True, torch.randn_like(x)))
    torch.library.opcheck(torch.ops.lime.silu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.lime.silu_bwd.default, (torch.randn_like(x), x))
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32


def test_custom_ops_pass_opcheck():
    check_custom_ops_pass_opcheck(torch.randn(4, 3, 20), torch.randn(20))


class RecordingMode(TorchDispatchMode):
    """Records the lime:: operators dispatched (below autograd: what the C++ autograd calls too)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lime":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


def check_frozen_weight_skips_weight_gradient(device: str) -> None:
    """A weight that needs no gradient: the backward asks the kernel for dx only, and dx is unchanged."""
    x, weight, grad_out = make_rms_inputs((37, 96), torch.float32, device)
    trained = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
    x_leaf = x.detach().clone().requires_grad_(True)
    frozen = weight.detach().clone()  # requires_grad False
    y = fused_rms_norm(x_leaf, frozen)
    with RecordingMode() as recording:
        y.backward(grad_out)
    assert [(name, args[4]) for name, args in recording.calls] == [("rms_norm_bwd.default", False)]
    assert frozen.grad is None
    torch.testing.assert_close(x_leaf.grad, trained[1], rtol=0, atol=0)
    _, rstd = torch.ops.lime.rms_norm_fwd(x, weight, EPS)
    dx, dweight = torch.ops.lime.rms_norm_bwd(grad_out, x, weight, rstd, False)
    assert dweight.shape == (0,) and dweight.dtype == weight.dtype
    torch.testing.assert_close(dx, trained[1], rtol=0, atol=0)


def test_frozen_weight_skips_the_weight_gradient_cpu():
    check_frozen_weight_skips_weight_gradient("cpu")


def test_cuda_extension_that_cannot_launch_falls_back(monkeypatch, caplog):
    """An extension built without code for this GPU imports, but its first launch fails: auto mode
    falls back with a warning that names the error, LIME_KERNELS=fused raises it."""
    original_load = _backend._load
    fake_cuda_extension = object()

    def load(name):
        if name == "megatron_lime._kernels_cuda":
            return _backend.LoadResult(fake_cuda_extension, None)
        return original_load(name)

    def probe(module):
        assert module is fake_cuda_extension
        return RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA B200 (simulated)")
    monkeypatch.setattr(_backend, "_load", load)
    monkeypatch.setattr(_backend, "_load_apex_rms_norm", lambda: _backend.LoadResult(None, ImportError("no apex")))
    monkeypatch.setattr(_backend, "_probe_cuda_launch", probe)
    with caplog.at_level("WARNING", logger="megatron_lime.kernels"):
        selection = _backend.select("auto")
    assert selection.cuda == "reference" and selection.cuda_extension is None
    assert selection.cpu == "fused-cpu"
    assert "no kernel image is available" in caplog.text and "NVIDIA B200" in caplog.text
    with pytest.raises(_backend.KernelsUnavailableError, match="no kernel image is available"):
        _backend.select("fused")
    monkeypatch.setattr(_backend, "_probe_cuda_launch", lambda module: None)  # a launch that works
    assert _backend.select("auto").cuda == "fused-cuda"


def saved_for_backward(fn) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward of fn() (saved_tensors_hooks sees C++ autograd too)."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def test_rms_norm_saves_only_rstd_besides_inputs():
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(32, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_for_backward(lambda: kernels.rms_norm(x, weight, EPS))
    assert [tuple(t.shape) for t in saved] == [(6, 32), (32,), (6,)]
    assert saved[2].dtype == torch.float32
    # add_rms_norm keeps h (the new residual, alive anyway as the next block's input), not its two inputs.
    delta = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_for_backward(lambda: kernels.add_rms_norm(x, delta, weight, EPS))
    assert [tuple(t.shape) for t in saved] == [(6, 32), (32,), (6,)]
    saved = saved_for_backward(lambda: kernels.silu(x))
    assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize("call, message", [
    (lambda: kernels.rms_norm(torch.randn(4, 8), torch.ones(7), EPS), "weight must have shape"),
    (lambda: torch.ops.lime.rms_norm_fwd(torch.randn(4, 8), torch.ones(7), EPS), "weight must have shape (8,)"),
    (lambda: torch.ops.lime.rms_norm_fwd(torch.ones(4, 8, dtype=torch.int32), torch.ones(8), EPS),
     "x must be float32, bfloat16, float16 or float64"),
    (lambda: torch.ops.lime.rms_norm_fwd(torch.randn(8, 4).t(), torch.ones(8), EPS), "x must be contiguous"),
    (lambda: torch.ops.lime.rms_norm_bwd(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8), torch.ones(8),
                                         torch.ones(4)), "dy and x must have the same dtype"),
    (lambda: torch.ops.lime.rms_norm_bwd(torch.randn(4, 8), torch.randn(4, 8), torch.ones(8), torch.ones(3)),
     "rstd must hold one value per row"),
    (lambda: torch.ops.lime.silu_bwd(torch.randn(4, 8), torch.randn(4, 9)), "dy and x must have the same shape"),
    (lambda: _backend.SELECTION.cpu_extension.rms_norm_fwd(torch.randn(4, 8, device="meta"), torch.ones(8), EPS),
     "x must be a cpu tensor"),
])
def test_input_checks_say_what_is_wrong(call, message):
    with pytest.raises((RuntimeError, ValueError)) as error:
        call()
    assert message.lower() in str(error.value).lower()


def test_torch_compile_traces_a_block_without_graph_breaks():
    torch.manual_seed(0)
    block = LimeBlock(LimeConfig.from_name("lime-tiny"))
    x, delta = torch.randn(2, 16, 64, requires_grad=True), torch.randn(2, 16, 64, requires_grad=True)

    def block_output(x, delta):  # a middle block: the previous block's MLP output added by its first norm
        return torch.add(*block(x, None, delta))

    explanation = torch._dynamo.explain(block_output)(x, delta)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; aot_eager runs the fake kernels and autograd tracing.
    compiled = torch.compile(block_output, fullgraph=True, backend="aot_eager")
    expected = outputs_and_grads(block_output, [x, delta], torch.ones(2, 16, 64))
    got = outputs_and_grads(compiled, [x, delta], torch.ones(2, 16, 64))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    torch._dynamo.reset()


def train_lime_tiny(steps: int) -> list[float]:
    torch.manual_seed(1234)
    model = LimeModel(LimeConfig.from_name("lime-tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    # One fixed batch, memorised over the steps: the loss must fall, so the gradients matter.
    tokens = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(99))
    losses = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lime_tiny_trains_the_same_with_fused_and_reference_kernels(monkeypatch):
    """The model's blocks call the fused ops (the operators run: counted), and 20 training steps give
    the losses of the references (the unfused add, rms_norm_ref, silu_ref) within rounding."""
    calls = {"rms_norm": 0, "add_rms_norm": 0, "silu": 0}
    operator_names = {"rms_norm": "RMS_NORM_FWD", "add_rms_norm": "ADD_RMS_NORM_FWD", "silu": "SILU_FWD"}
    for op, name in operator_names.items():
        def counting(*args, _op=op, _operator=getattr(_backend, name)):
            calls[_op] += 1
            return _operator(*args)
        monkeypatch.setattr(_backend, name, counting)
    fused = train_lime_tiny(20)
    # Per step: the first block's attention norm; in each of the 2 blocks the fused add + MLP norm and SiLU; the
    # second block's attention norm and the final norm each add the block before's MLP output (fused).
    assert calls == {"rms_norm": 20 * 1, "add_rms_norm": 20 * 4, "silu": 20 * 2}

    monkeypatch.setattr(kernels, "rms_norm", kernels.rms_norm_ref)
    monkeypatch.setattr(kernels, "add_rms_norm", kernels.add_rms_norm_ref)
    monkeypatch.setattr(kernels, "silu", kernels.silu_ref)
    reference = train_lime_tiny(20)
    assert fused[-1] < fused[0] - 0.5, f"the model did not learn: {fused}"
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=2e-5, atol=2e-5)


def test_fused_by_name_raises_the_saved_import_error(monkeypatch):
    original_load = _backend._load

    def load_without_cpu_extension(name):
        if name == "megatron_lime._kernels_cpu":
            return _backend.LoadResult(None, ImportError("simulated: undefined symbol in _kernels_cpu"))
        return original_load(name)

    monkeypatch.setattr(_backend, "_load", load_without_cpu_extension)
    with pytest.raises(_backend.KernelsUnavailableError, match="simulated: undefined symbol") as error:
        _backend.select("fused")
    assert isinstance(error.value.__cause__, ImportError)
    fallback = _backend.select("auto")  # not asked by name: falls back, and says so
    assert fallback.cpu == "reference"
    assert _backend.select("reference").cpu == "reference"
    with pytest.raises(ValueError, match="LIME_KERNELS"):
        _backend.select("fastest")


def test_lime_kernels_environment_variable_forces_the_reference():
    code = ("import torch; from megatron_lime import kernels; "
            "x = torch.randn(3, 8, requires_grad=True); y = kernels.rms_norm(x, torch.ones(8), 1e-5); "
            "print(kernels.backend('cpu'), type(y.grad_fn).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LIME_KERNELS": "reference"})
    assert result.returncode == 0, result.stderr
    backend, grad_fn = result.stdout.split()
    assert backend == "reference" and grad_fn == "MulBackward0"  # rms_norm_ref's last op, not our operator


# ---- CUDA: the same checks on the GPU kernels, when a GPU is present ----

@cuda_only
def test_cuda_extension_is_chosen_and_cpu_tensors_stay_on_cpu_kernels():
    assert kernels.backend("cuda") in ("fused-cuda", "apex")
    assert kernels.backend("cpu") == "fused-cpu"


# On CUDA also: lime-1b's rows; rows as wide as the widest the fused weight gradient keeps in
# shared memory (3072 bf16: 4 warps per block) and wider (4096 fp32: the separate pass); more
# rows than the backward grid has warps (each warp then sums several rows).
# The fast kernels' widths (64, 128, 768, 1536 and 2048, whose backward is the generic one), with row
# counts that leave a partial last block and, for the backward, more rows than its grid has groups.
CUDA_RMS_NORM_SHAPES = RMS_NORM_SHAPES + [(8192, 1536), (33, 3072), (64, 4096), (20000, 64), (1001, 128),
                                          (333, 768), (257, 2048), (3, 1536)]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CUDA_RMS_NORM_SHAPES, ids=str)
def test_rms_norm_matches_reference_cuda(shape, dtype):
    check_rms_norm(shape, dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CUDA_RMS_NORM_SHAPES, ids=str)
def test_add_rms_norm_matches_reference_cuda(shape, dtype):
    check_add_rms_norm(shape, dtype, "cuda")


@cuda_only
def test_add_rms_norm_bf16_with_fp32_weight_cuda():
    check_add_rms_norm((8192, 1536), torch.bfloat16, "cuda", weight_dtype=torch.float32)


@cuda_only
def test_shape_choice_plan_on_cuda(monkeypatch, caplog, tmp_path):
    """The real timer (CUDA events): one measurement per planned shape, a logged line, then lookups only."""
    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(tmp_path))
    choices = _backend.ShapeChoices(mode="measure", candidates=_backend.CHOICES.candidates)
    monkeypatch.setattr(_backend, "CHOICES", choices)
    x, weight, _ = make_rms_inputs((8192, 1536), torch.bfloat16, "cuda")
    with caplog.at_level("INFO", logger="megatron_lime.kernels"):
        plan = kernels.plan_kernel_choices(lambda: kernels.silu(kernels.rms_norm(x, weight, EPS)), "cuda")
    assert {key[0] for key in plan} == {"rms_norm", "silu"} and len(choices.choices) == 2
    assert len([r for r in caplog.records if "kernel choice" in r.getMessage()]) == 2
    torch.testing.assert_close(kernels.rms_norm(x, weight, EPS), kernels.rms_norm_ref(x, weight, EPS),
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kernels.silu(x), kernels.silu_ref(x), rtol=2e-2, atol=2e-2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SILU_SHAPES + [(8192, 6144)], ids=str)
def test_silu_matches_reference_cuda(shape, dtype):
    check_silu(shape, dtype, "cuda")


MIXED_WEIGHT_DTYPES = pytest.mark.parametrize(
    "x_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                              (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
                              (torch.bfloat16, torch.bfloat16)], ids=str)


def check_mixed_weight_dtypes(device: str, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    """The weight read in its own dtype (fp32 master weights) or converted (any other pairing):
    output and gradients against the reference, which computes in fp32 and rounds once (a
    weight read as the wrong type would be off by far more than a rounding step)."""
    for shape in ((65, 1536) if device == "cuda" else (33, 256), (5, 123)):  # packs, then the scalar path
        x, weight, grad_out = make_rms_inputs(shape, x_dtype, device, weight_dtype)
        ours = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
        reference = outputs_and_grads(lambda a, w: kernels.rms_norm_ref(a, w, EPS), [x, weight], grad_out)
        assert [t.dtype for t in ours] == [x_dtype, x_dtype, weight_dtype]
        for o, r in zip(ours, reference):
            torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2)


@MIXED_WEIGHT_DTYPES
def test_rms_norm_mixed_weight_dtypes_cpu(x_dtype, weight_dtype):
    check_mixed_weight_dtypes("cpu", x_dtype, weight_dtype)


@cuda_only
@MIXED_WEIGHT_DTYPES
def test_rms_norm_mixed_weight_dtypes_cuda(x_dtype, weight_dtype):
    check_mixed_weight_dtypes("cuda", x_dtype, weight_dtype)


@cuda_only
def test_frozen_weight_skips_the_weight_gradient_cuda():
    check_frozen_weight_skips_weight_gradient("cuda")


@cuda_only
def test_custom_ops_pass_opcheck_cuda():
    check_custom_ops_pass_opcheck(torch.randn(4, 3, 24, device="cuda", dtype=torch.bfloat16),
                                  torch.randn(24, device="cuda"))


@cuda_only
def test_cuda_ops_under_torch_compile_match_eager():
    """Inductor (the default backend, real code generation) around the custom ops, fwd and bwd."""
    torch._dynamo.reset()

    def layer(x, weight):
        return kernels.silu(kernels.rms_norm(x, weight, EPS) * 2.0) + x

    x, weight, grad_out = make_rms_inputs((4, 64, 1536), torch.bfloat16, "cuda", torch.float32)
    expected = outputs_and_grads(layer, [x, weight], grad_out)
    got = outputs_and_grads(torch.compile(layer, fullgraph=True), [x, weight], grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()


@cuda_only
@pytest.mark.parametrize("offset", [1, 8], ids=["unaligned", "aligned"])
def test_tensors_with_a_storage_offset_cuda(offset):
    """Views into a larger buffer: an offset of 1 element breaks 16-byte alignment (scalar path)."""
    rows, n = 33, 1536
    for dtype in (torch.float32, torch.bfloat16):
        storage = torch.randn(rows * n + offset, device="cuda").to(dtype)
        x = storage[offset:].view(rows, n)
        assert x.storage_offset() == offset and x.is_contiguous()
        weight_storage = torch.randn(n + offset, device="cuda")
        weight = weight_storage[offset:]
        grad_out = torch.randn(rows, n, device="cuda").to(dtype)
        ours = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
        reference = outputs_and_grads(lambda a, w: kernels.rms_norm_ref(a, w, EPS), [x, weight], grad_out)
        tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        for o, r in zip(ours, reference):
            torch.testing.assert_close(o, r, **tolerance)
        torch.testing.assert_close(fused_silu(x), kernels.silu_ref(x))


@cuda_only
def test_kernels_run_on_a_side_stream_and_a_second_device_cuda():
    """The kernels launch on the current stream (not the default one) and on the tensor's own GPU."""
    x, weight, grad_out = make_rms_inputs((256, 1536), torch.bfloat16, "cuda", torch.float32)
    expected = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x, weight], grad_out)
        silu_side = fused_silu(x)
    torch.cuda.current_stream().wait_stream(side)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(silu_side, fused_silu(x), rtol=0, atol=0)
    if torch.cuda.device_count() < 2:
        return  # one GPU: the second-device half needs two
    other = torch.device("cuda", 1)
    got = outputs_and_grads(lambda a, w: fused_rms_norm(a, w), [x.to(other), weight.to(other)],
                            grad_out.to(other))
    assert all(t.device == other for t in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e.cpu(), rtol=0, atol=0)


@cuda_only
def test_cuda_bf16_activations_with_fp32_weight_and_gradcheck():
    check_rms_norm((33, 1536), torch.bfloat16, "cuda", weight_dtype=torch.float32)
    x = torch.randn(3, 5, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    weight = torch.randn(13, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: fused_rms_norm(a, w), (x, weight))
    assert torch.autograd.gradcheck(fused_silu, (torch.randn(4, 11, dtype=torch.float64, device="cuda",
                                                                     requires_grad=True),))


# ---- the per-shape choice between ours and PyTorch's op (CUDA in use; tested on CPU with a fake timer) ----

def lime_operators_called(fn) -> list[str]:
    with RecordingMode() as recording:
        fn()
    return [name for name, _ in recording.calls]


def fake_timer(milliseconds: list[float], timed: list[str]):
    """A timer that runs each candidate once for real (so the candidates must work) and returns the
    next of the given times: per planned shape, ours is timed first, then PyTorch's."""
    times = iter(milliseconds)

    def timer(fn, device) -> float:
        fn()
        timed.append(device.type)
        return next(times)

    return timer


@pytest.fixture
def measured_choices(monkeypatch, tmp_path):
    """CHOICES planning on CPU (as it does on CUDA), with a fake timer the test sets and a private cache."""
    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(tmp_path / "cache"))

    def install(milliseconds: list[float], mode: str = "measure") -> tuple[_backend.ShapeChoices, list[str]]:
        timed: list[str] = []
        choices = _backend.ShapeChoices(mode=mode, timer=fake_timer(milliseconds, timed), devices=("cpu",),
                                        candidates=_backend.CHOICES.candidates)
        monkeypatch.setattr(_backend, "CHOICES", choices)
        return choices, timed
    return install


def test_shape_choice_is_planned_once_outside_the_forward_and_logged(measured_choices, caplog):
    # Two planned shapes: (8, 64) ours 2.0 ms, PyTorch's 1.0 -> PyTorch's; (16, 64) ours 1.0, PyTorch's 3.0 -> ours.
    choices, timed = measured_choices([2.0, 1.0, 1.0, 3.0])
    weight = torch.randn(64, requires_grad=True)
    small, large = torch.randn(8, 64, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    # Before a plan nothing is timed, whatever the shape: ours.
    assert lime_operators_called(lambda: kernels.rms_norm(small, weight, EPS)) == ["rms_norm_fwd.default"]
    assert timed == [] and choices.choices == {}

    def forward() -> None:  # what the run calls; nothing may be timed while it runs
        kernels.rms_norm(small, weight, EPS)
        assert timed == []
        kernels.rms_norm(large.view(2, 8, 64), weight, EPS)  # (b, s, d) is 16 rows of 64
        kernels.rms_norm(small, weight, EPS)

    with caplog.at_level("INFO", logger="megatron_lime.kernels"):
        plan = kernels.plan_kernel_choices(forward, "cpu")
    assert timed == ["cpu"] * 4  # each recorded shape timed once, after the forward
    assert choices.choices == {("rms_norm", 8, 64, torch.float32): "torch", ("rms_norm", 16, 64, torch.float32): "ours"}
    assert plan[("rms_norm", 8, 64, torch.float32)] == (2.0, 1.0, "torch", "measured")
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_lime.kernels"]
    assert len(lines) == 2, lines
    assert "rms_norm (8, 64) float32" in lines[0] and "using PyTorch's" in lines[0]
    assert "rms_norm (16, 64) float32" in lines[1] and "using ours" in lines[1]
    # Afterwards: lookups only, never a timing, and no new entries for new shapes (the nearest planned one's choice).
    assert lime_operators_called(lambda: kernels.rms_norm(small, weight, EPS)) == []  # PyTorch's
    assert lime_operators_called(lambda: kernels.rms_norm(large, weight, EPS)) == ["rms_norm_fwd.default"]
    assert lime_operators_called(lambda: kernels.rms_norm(torch.randn(7, 64), weight, EPS)) == []  # nearest: 8
    assert lime_operators_called(lambda: kernels.rms_norm(torch.randn(40, 64), weight, EPS)) == [
        "rms_norm_fwd.default"]  # nearest: 16
    assert lime_operators_called(lambda: kernels.rms_norm(torch.randn(8, 32), weight[:32], EPS)) == [
        "rms_norm_fwd.default"]  # another width: nothing planned, ours
    assert timed == ["cpu"] * 4 and len(choices.choices) == 2
    # Whichever is chosen, the result is the op's (the same maths, rounding apart), with gradients.
    for x in (small, large):
        torch.testing.assert_close(kernels.rms_norm(x, weight, EPS), kernels.rms_norm_ref(x, weight, EPS))
    kernels.rms_norm(small, weight, EPS).sum().backward()
    assert small.grad is not None and weight.grad is not None


def test_shape_choice_is_kept_on_disk_and_read_back(measured_choices, tmp_path, caplog):
    x, weight = torch.randn(8, 64), torch.randn(64)
    _, timed = measured_choices([2.0, 1.0])
    kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    assert len(timed) == 2
    stored = json.loads((tmp_path / "cache" / "kernel_choices.json").read_text())
    (name, times), = stored["entries"].items()
    assert name.endswith("|rms_norm|8x64|float32") and f"torch {torch.__version__}" in name and times == [2.0, 1.0]
    # A second run (a new process's CHOICES) reads it: nothing timed, the same choice, "cached" in the log.
    choices, timed = measured_choices([])
    with caplog.at_level("INFO", logger="megatron_lime.kernels"):
        plan = kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    assert timed == [] and plan[("rms_norm", 8, 64, torch.float32)] == (2.0, 1.0, "torch", "cached")
    assert choices.choices == {("rms_norm", 8, 64, torch.float32): "torch"}
    assert any("cached" in r.getMessage() for r in caplog.records)
    # Timed against compiled PyTorch ops (a --torch-compile run) is another entry: measured again.
    _, timed = measured_choices([2.0, 1.0])
    kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu", compiled=True)
    assert len(timed) == 2 and len(json.loads((tmp_path / "cache" / "kernel_choices.json").read_text())["entries"]) == 2
    stored = json.loads((tmp_path / "cache" / "kernel_choices.json").read_text())
    stored["entries"] = {k: v for k, v in stored["entries"].items() if "against compiled" not in k}
    # Another kernel build is another entry: measured again.
    stored["entries"] = {name.replace("|build ", "|build other-"): t for name, t in stored["entries"].items()}
    (tmp_path / "cache" / "kernel_choices.json").write_text(json.dumps(stored))
    _, timed = measured_choices([1.0, 2.0])
    kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    assert len(timed) == 2
    # A damaged file is a warning and a new measurement, never a crash.
    (tmp_path / "cache" / "kernel_choices.json").write_text("{not json")
    _, timed = measured_choices([1.0, 2.0])
    with caplog.at_level("WARNING", logger="megatron_lime.kernels"):
        kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    assert len(timed) == 2 and any("unreadable" in r.getMessage() for r in caplog.records)


def test_shape_choice_stands_when_its_cache_cannot_be_written(measured_choices, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    choices, timed = measured_choices([2.0, 1.0])
    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(blocker / "cache"))  # after the fixture's own folder
    x, weight = torch.randn(8, 64), torch.randn(64)
    with caplog.at_level("WARNING", logger="megatron_lime.kernels"):
        kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    assert len(timed) == 2 and choices.choices == {("rms_norm", 8, 64, torch.float32): "torch"}
    assert any("could not be written" in r.getMessage() for r in caplog.records)


def test_shape_choice_covers_add_rms_norm_and_silu(measured_choices):
    _, timed = measured_choices([1.0, 2.0, 2.0, 1.0])  # add_rms_norm: ours; silu: PyTorch's
    residual, delta, weight = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    kernels.plan_kernel_choices(lambda: (kernels.add_rms_norm(residual, delta, weight, EPS), kernels.silu(residual)),
                                "cpu")
    assert lime_operators_called(lambda: kernels.add_rms_norm(residual, delta, weight, EPS)) == [
        "add_rms_norm_fwd.default"]
    assert lime_operators_called(lambda: kernels.silu(residual)) == []
    assert len(timed) == 4
    h, _ = kernels.add_rms_norm(residual, delta, weight, EPS)
    torch.testing.assert_close(h, residual + delta, rtol=0, atol=0)
    torch.testing.assert_close(kernels.silu(residual), kernels.silu_ref(residual))


def test_shape_choice_can_be_forced_and_compiled_graphs_follow_the_plan(measured_choices):
    x, weight = torch.randn(8, 64), torch.randn(64)
    _, timed = measured_choices([], mode="torch")
    assert lime_operators_called(lambda: kernels.rms_norm(x, weight, EPS)) == []
    _, timed = measured_choices([], mode="ours")
    assert lime_operators_called(lambda: kernels.rms_norm(x, weight, EPS)) == ["rms_norm_fwd.default"]
    # Mixed dtypes (bf16 activations, fp32 weight) are never handed to F.rms_norm (it would promote).
    _, timed = measured_choices([], mode="torch")
    assert lime_operators_called(lambda: kernels.rms_norm(x.bfloat16(), weight, EPS)) == ["rms_norm_fwd.default"]
    # Tracing: the plan's choice (made before), never a timing, no graph break.
    choices, timed = measured_choices([2.0, 1.0])  # PyTorch's at (8, 64)
    kernels.plan_kernel_choices(lambda: kernels.rms_norm(x, weight, EPS), "cpu")
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda a, w: kernels.silu(kernels.rms_norm(a, w, EPS)), backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), kernels.silu_ref(kernels.rms_norm_ref(x, weight, EPS)))
    torch._dynamo.reset()
    (graph,) = graphs
    targets = " ".join(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
    assert "lime.silu_fwd" in targets and "lime.rms_norm_fwd" not in targets and "rms_norm" in targets
    assert len(timed) == 2 and len(choices.choices) == 1
    with pytest.raises(ValueError, match="LIME_KERNEL_CHOICE"):
        _backend.ShapeChoices(mode="fastest")
    with pytest.raises(ValueError, match="kernel choice"):
        kernels.set_kernel_choice("fastest")
