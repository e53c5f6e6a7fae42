"""Fused RMSNorm and SiLU kernels against their references: outputs, every gradient, dtypes,
odd shapes, gradcheck, input checks, torch.compile without graph breaks, backend selection,
and a lime-tiny model trained 20 steps with the fused kernels and with the references."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_lime import kernels
from megatron_lime.config import LimeConfig
from megatron_lime.kernels import _backend
from megatron_lime.kernels.rms_norm import RMSNormFunction
from megatron_lime.kernels.silu import SiLUFunction
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
    ours = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
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
    ours = outputs_and_grads(SiLUFunction.apply, [x], grad_out)
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
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, EPS), (x, weight))
    assert torch.autograd.gradcheck(SiLUFunction.apply, (torch.randn(4, 11, dtype=torch.float64, requires_grad=True),))


def check_custom_ops_pass_opcheck(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    torch.library.opcheck(torch.ops.lime.rms_norm_fwd.default, (x, weight, EPS))
    y, rstd = torch.ops.lime.rms_norm_fwd(x, weight, EPS)
    for weight_grad in (True, False):
        torch.library.opcheck(torch.ops.lime.rms_norm_bwd.default, (torch.randn_like(x), x, weight, rstd, weight_grad))
    torch.library.opcheck(torch.ops.lime.silu_fwd.default, (x,))
    torch.library.opcheck(torch.ops.lime.silu_bwd.default, (torch.randn_like(x), x))
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32


def test_custom_ops_pass_opcheck():
    check_custom_ops_pass_opcheck(torch.randn(4, 3, 20), torch.randn(20))


def check_frozen_weight_skips_weight_gradient(device: str, monkeypatch) -> None:
    """A weight that needs no gradient: the backward asks the kernel for dx only, and dx is unchanged."""
    x, weight, grad_out = make_rms_inputs((37, 96), torch.float32, device)
    asked = []
    extension_for = _backend.extension_for

    class Recording:
        def __init__(self, module):
            self.module = module

        def rms_norm_bwd(self, dy, x, weight, rstd, weight_grad):
            asked.append(weight_grad)
            return self.module.rms_norm_bwd(dy, x, weight, rstd, weight_grad)

        def __getattr__(self, name):
            return getattr(self.module, name)

    monkeypatch.setattr(_backend, "extension_for", lambda device: Recording(extension_for(device)))
    trained = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
    x_leaf = x.detach().clone().requires_grad_(True)
    frozen = weight.detach().clone()  # requires_grad False
    RMSNormFunction.apply(x_leaf, frozen, EPS).backward(grad_out)
    assert asked == [True, False]
    assert frozen.grad is None
    torch.testing.assert_close(x_leaf.grad, trained[1], rtol=0, atol=0)
    _, rstd = torch.ops.lime.rms_norm_fwd(x, weight, EPS)
    dx, dweight = torch.ops.lime.rms_norm_bwd(grad_out, x, weight, rstd, False)
    assert dweight.shape == (0,) and dweight.dtype == weight.dtype
    torch.testing.assert_close(dx, trained[1], rtol=0, atol=0)


def test_frozen_weight_skips_the_weight_gradient_cpu(monkeypatch):
    check_frozen_weight_skips_weight_gradient("cpu", monkeypatch)


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


def test_rms_norm_saves_only_rstd_besides_inputs():
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(32, dtype=torch.bfloat16, requires_grad=True)
    y = kernels.rms_norm(x, weight, EPS)
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(6, 32), (32,), (6,)]
    assert saved[2].dtype == torch.float32


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
    x = torch.randn(2, 16, 64, requires_grad=True)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; aot_eager runs the fake kernels and autograd tracing.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = outputs_and_grads(block, [x], torch.ones(2, 16, 64))
    got = outputs_and_grads(compiled, [x], torch.ones(2, 16, 64))
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
    calls = {"rms_norm": 0, "silu": 0}
    fused_rms_norm, fused_silu = kernels.rms_norm, kernels.silu

    def counting_rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        y = fused_rms_norm(x, weight, eps)
        assert type(y.grad_fn).__name__.startswith("RMSNormFunction"), "the model did not take the fused path"
        return y

    def counting_silu(x):
        calls["silu"] += 1
        y = fused_silu(x)
        assert type(y.grad_fn).__name__.startswith("SiLUFunction"), "the model did not take the fused path"
        return y

    monkeypatch.setattr(kernels, "rms_norm", counting_rms_norm)
    monkeypatch.setattr(kernels, "silu", counting_silu)
    fused = train_lime_tiny(20)
    assert calls == {"rms_norm": 20 * 5, "silu": 20 * 2}  # 2 layers x 2 norms + the final norm; 2 MLPs

    monkeypatch.setattr(kernels, "rms_norm", kernels.rms_norm_ref)
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
    assert backend == "reference" and not grad_fn.startswith("RMSNormFunction")


# ---- CUDA: the same checks on the GPU kernels, when a GPU is present ----

@cuda_only
def test_cuda_extension_is_chosen_and_cpu_tensors_stay_on_cpu_kernels():
    assert kernels.backend("cuda") in ("fused-cuda", "apex")
    assert kernels.backend("cpu") == "fused-cpu"


# On CUDA also: lime-1b's rows; rows as wide as the widest the fused weight gradient keeps in
# shared memory (3072 bf16: 4 warps per block) and wider (4096 fp32: the separate pass); more
# rows than the backward grid has warps (each warp then sums several rows).
CUDA_RMS_NORM_SHAPES = RMS_NORM_SHAPES + [(8192, 1536), (33, 3072), (64, 4096), (20000, 64)]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CUDA_RMS_NORM_SHAPES, ids=str)
def test_rms_norm_matches_reference_cuda(shape, dtype):
    check_rms_norm(shape, dtype, "cuda")


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
        ours = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
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
def test_frozen_weight_skips_the_weight_gradient_cuda(monkeypatch):
    check_frozen_weight_skips_weight_gradient("cuda", monkeypatch)


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
        ours = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
        reference = outputs_and_grads(lambda a, w: kernels.rms_norm_ref(a, w, EPS), [x, weight], grad_out)
        tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        for o, r in zip(ours, reference):
            torch.testing.assert_close(o, r, **tolerance)
        torch.testing.assert_close(SiLUFunction.apply(x), kernels.silu_ref(x))


@cuda_only
def test_kernels_run_on_a_side_stream_and_a_second_device_cuda():
    """The kernels launch on the current stream (not the default one) and on the tensor's own GPU."""
    x, weight, grad_out = make_rms_inputs((256, 1536), torch.bfloat16, "cuda", torch.float32)
    expected = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x, weight], grad_out)
        silu_side = SiLUFunction.apply(x)
    torch.cuda.current_stream().wait_stream(side)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(silu_side, SiLUFunction.apply(x), rtol=0, atol=0)
    if torch.cuda.device_count() < 2:
        return  # one GPU: the second-device half needs two
    other = torch.device("cuda", 1)
    got = outputs_and_grads(lambda a, w: RMSNormFunction.apply(a, w, EPS), [x.to(other), weight.to(other)],
                            grad_out.to(other))
    assert all(t.device == other for t in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu(), e.cpu(), rtol=0, atol=0)


@cuda_only
def test_cuda_bf16_activations_with_fp32_weight_and_gradcheck():
    check_rms_norm((33, 1536), torch.bfloat16, "cuda", weight_dtype=torch.float32)
    x = torch.randn(3, 5, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    weight = torch.randn(13, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, EPS), (x, weight))
    assert torch.autograd.gradcheck(SiLUFunction.apply, (torch.randn(4, 11, dtype=torch.float64, device="cuda",
                                                                     requires_grad=True),))
