"""The language-model loss: cross-entropy in fp32 over the positions that have a label and a non-zero mask.

Two implementations of the same loss:

    language_model_loss(logits, ...)             from materialised logits (b, s, vocab)
    chunked_language_model_loss(hidden, W, ...)  from the final hidden states and the tied head W,
                                                 chunk_size tokens at a time

The chunked one never holds the logits of the whole micro-batch: at lime-1b, micro-batch 16, seq 512
they are 16 x 512 x 50,000 fp32 = 1.6 GB, plus the log-softmax autograd saves and the gradient of the
same size. Each chunk computes its logits, its loss and, in the same pass, its share of the gradients
(dL/dhidden for its tokens, dL/dW accumulated in fp32), then frees the logits; the backward only scales
the stored gradients by the incoming one. No recomputation: the head's matmuls are done once each.

Bytes moved per chunk (lime-1b: c = 1,024 tokens, vocab 50,000, d 1,536, bf16; reads + writes of each kernel,
not counting the three GEMMs' reads of the head weight, 3 x 154 MB, the same before and after):
  before (bf16 logits, .float(), logsumexp, sub_, exp_, mul_, .to(bf16), a bf16 dW GEMM, .float(), +=):
      logits 102 + upcast 307 + logsumexp ~1,229 (amax, sub, exp, sum over fp32) + sub_/exp_ 819 + mul_ 410
      + downcast 307 + dh GEMM 102 + dW GEMM 102 + 154 + dW upcast 461 + += 922             = about 4.9 GB
  now (bf16 logits; one compiled body: a reduction over the logits and one pointwise pass writing the bf16
      gradient; dW by one addmm with fp32 output into the fp32 buffer):
      logits 102 + body 307 (read, read, write) + dh GEMM 102 + dW addmm 102 + 614 (fp32 read + write)
                                                                                          = about 1.2 GB
  (1.4 GB where addmm cannot write fp32 from bf16 inputs and the bf16 product is added instead; the eager body,
  used on CPUs, keeps the old passes.) What is left is mostly the fp32 dW buffer's read and write per chunk.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """(b*s,) fp32 weight of each token: 0 where the label is IGNORE_INDEX, else the loss mask (default 1)."""
    weights = (labels.flatten() != IGNORE_INDEX).float()  # (b*s,)
    if loss_mask is not None:
        weights = weights * loss_mask.flatten().float()
    return weights


def _reduce(total: torch.Tensor, count: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1.0), count


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                        reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy in fp32 from logits (b, s, vocab); labels (b, s) with -100 for no target; loss_mask (b, s).

    Returns (loss, number of covered tokens); `reduction` is "mean" or "sum".
    """
    _check_reduction(reduction)
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="none")  # (b*s,)
    weights = _token_weights(labels, loss_mask)  # (b*s,)
    return _reduce((per_token * weights).sum(), weights.sum(), reduction)


def chunk_loss_and_logit_grad(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t w_t * CE(logits_t, label_t) and its gradient with respect to the logits, in one fused body.

    logits (c, vocab) in the model's dtype; labels (c,) >= 0; token_weights (c,) fp32. Returns the fp32 loss sum and
    w * (softmax(logits) - onehot(labels)) in the logits' dtype (c, vocab). Written for torch.compile: Inductor makes
    it one reduction (max and sum of exp, reading the logits once) and one pointwise kernel (reading them again and
    writing the gradient), with no (c, vocab) fp32 tensor in memory. Eager, it is the reference the tests hold the
    compiled body to.
    """
    x = logits.float()  # (c, vocab)
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    target = x.gather(1, labels[:, None]).squeeze(1)  # (c,)
    total = ((lse - target) * token_weights).sum()
    vocab = torch.arange(x.shape[1], device=x.device)  # (vocab,)
    softmax = torch.exp(x - lse[:, None])  # (c, vocab)
    grad = torch.where(vocab[None, :] == labels[:, None], softmax - 1.0, softmax) * token_weights[:, None]
    return total, grad.to(logits.dtype)


def chunk_loss_and_logit_grad_in_place(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_loss_and_logit_grad without a compiler: the softmax formed in place in one fp32 copy of the logits."""
    x = logits.float()  # (c, vocab); the logits themselves when they are fp32 (ours to overwrite)
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    target = x.gather(1, labels[:, None]).squeeze(1)  # (c,)
    total = ((lse - target) * token_weights).sum()
    grad = x.sub_(lse[:, None]).exp_()  # (c, vocab) softmax
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    grad.mul_(token_weights[:, None])
    return total, grad.to(logits.dtype)


# The chunk body by device type: torch.compile'd where Inductor generates GPU kernels (one reduction and one
# pointwise pass instead of about seven), the in-place eager body elsewhere (a CPU gains little and would pay
# the compilation in every short run and test). LIME_LOSS_COMPILE=0 keeps the eager body on GPUs too.
_BODIES: dict[str, object] = {}


def _chunk_body(device: torch.device):
    body = _BODIES.get(device.type)
    if body is None:
        wanted = device.type == "cuda" and os.environ.get("LIME_LOSS_COMPILE", "1") != "0"
        body = (torch.compile(chunk_loss_and_logit_grad, fullgraph=True, dynamic=False) if wanted
                else chunk_loss_and_logit_grad_in_place)
        _BODIES[device.type] = body
    return body


_FP32_OUT_ADDMM: dict[str, bool] = {}


def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether addmm(fp32, bf16, bf16, out_dtype=float32, out=fp32) runs here (CUDA in torch >= 2.8), tried once."""
    if device.type not in _FP32_OUT_ADDMM:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(8, 16, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(16, 4, device=device, generator=g).to(torch.bfloat16)
            c = torch.ones(8, 4, device=device)
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            works = torch.allclose(c, 1.0 + a.float() @ b.float(), rtol=1e-3, atol=1e-3)
        except (RuntimeError, NotImplementedError, TypeError):
            works = False
        _FP32_OUT_ADDMM[device.type] = works
    return _FP32_OUT_ADDMM[device.type]


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (vocab, d) fp32 += grad_logits^T (vocab, c) @ hidden (c, d), with one pass over grad_weight."""
    if grad_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    elif grad_logits.dtype == hidden.dtype and _fp32_out_addmm_works(grad_weight.device):
        # the GEMM's epilogue adds into the fp32 buffer
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:  # a (vocab, d) product in the model's dtype, added into the fp32 buffer (promoted by add_)
        grad_weight.add_(grad_logits.t() @ hidden)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(hidden_t @ W^T, label_t), with its gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_size: int, need_hidden_grad: bool,
                need_weight_grad: bool):
        # hidden (n, d), weight (vocab, d), labels (n,) >= 0 (ignored positions carry weight 0), token_weights (n,) fp32
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (n, d)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        body = _chunk_body(hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]  # (c, d)
            y = labels[start:start + chunk_size]  # (c,)
            w = token_weights[start:start + chunk_size]  # (c,)
            # Logits in the model's dtype (what the unchunked path computes), upcast inside the body.
            logits = F.linear(h, weight)  # (c, vocab)
            if grad_hidden is None and grad_weight is None:
                lse = torch.logsumexp(logits.float(), dim=-1)  # (c,)
                total += ((lse - logits.gather(1, y[:, None]).squeeze(1).float()) * w).sum()
                continue
            chunk_total, grad_logits = body(logits, y, w)  # (), (c, vocab) in the model's dtype
            total += chunk_total
            del logits
            if grad_hidden is not None:
                rows = grad_hidden[start:start + chunk_size]  # (c, d)
                if grad_logits.dtype == rows.dtype:
                    torch.mm(grad_logits, weight, out=rows)
                else:  # under autocast the logits and their gradient are in its dtype, the model's tensors not
                    rows.copy_(grad_logits @ weight)
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, h)  # (vocab, d), accumulated in fp32
            del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors

        def scale(g):
            return None if g is None else g * grad_total.to(g.dtype)

        return scale(grad_hidden), scale(grad_weight), None, None, None, None, None


def chunked_language_model_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                loss_mask: torch.Tensor | None, reduction: str = "mean",
                                chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """language_model_loss(F.linear(hidden, weight), ...) without materialising all the logits.

    hidden: (b, s, d) final hidden states; weight: (vocab, d) the output head (the tied embedding);
    labels (b, s) with -100 for no target; loss_mask (b, s) or None; chunk_size: tokens per chunk.
    Returns (loss, number of covered tokens), as language_model_loss.
    """
    _check_reduction(reduction)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    weights = _token_weights(labels, loss_mask)  # (b*s,)
    grad = torch.is_grad_enabled()
    total = _ChunkedHeadCrossEntropy.apply(
        hidden.flatten(0, 1), weight, labels.flatten().clamp(min=0), weights, chunk_size,
        grad and hidden.requires_grad, grad and weight.requires_grad)
    return _reduce(total, weights.sum(), reduction)
