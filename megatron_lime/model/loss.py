"""The language-model loss: cross-entropy in fp32 over the positions that have a label and a non-zero mask.

Two implementations of the same loss:

    language_model_loss(logits, ...)             from materialised logits (b, s, vocab)
    chunked_language_model_loss(hidden, W, ...)  from the final hidden states and the tied head W,
                                                 chunk_size tokens at a time

The chunked one never holds fp32 logits of the whole micro-batch: at lime-1b, micro-batch 16, seq 512 they are
16 x 512 x 50,000 fp32 = 1.6 GB, plus the log-softmax autograd saves and the gradient of the same size. It forms
the logits chunk by chunk (chunk_size tokens) in the model's compute dtype into one buffer of the micro-batch,
each chunk's fused body overwrites them with their gradient (w * (softmax - onehot)) while summing the loss, and
then the head's two gradient GEMMs run once over the whole buffer: dL/dhidden = G @ W and dL/dW = G^T @ hidden,
written once, in the weight's dtype. The backward only scales the stored gradients by the incoming one. No
recomputation: the head's matmuls are done once each.

Bytes moved per 1,024 tokens (lime-1b: vocab 50,000, d 1,536, bf16; reads + writes of each kernel, not counting
the GEMMs' reads of the head weight):
  first (bf16 logits, .float(), logsumexp, sub_, exp_, mul_, .to(bf16), a bf16 dW GEMM, .float(), +=):
      logits 102 + upcast 307 + logsumexp ~1,229 + sub_/exp_ 819 + mul_ 410 + downcast 307 + dh GEMM 102
      + dW GEMM 102 + 154 + dW upcast 461 + += 922                                         = about 4.9 GB
  then (one compiled body per chunk; dW accumulated per chunk by an fp32-output addmm into an fp32 buffer):
      logits 102 + body 307 (read, read, write) + dh GEMM 102 + dW addmm 102 + 614 (the fp32 dW read + written)
                                                                                           = about 1.2 GB
  now (the body writes the gradient over the logits; dh and dW GEMMs once per micro-batch):
      logits 102 + body 307 + dh GEMM 102 + dW GEMM 102                                    = about 0.6 GB
      plus, once per micro-batch, dW written once: 154 MB (bf16 weights) or 307 MB (fp32, --precision autocast)
  Under autocast the head weight was also cast to bf16 for every chunk's GEMM (461 MB each): now once per call.
The price is the logits' gradient of the whole micro-batch in memory, in the compute dtype (0.8 GB at
micro-batch 16, 1.6 GB at 32), cut into groups of LOGIT_GRAD_BUDGET_BYTES when larger.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from megatron_lime.model.linear import accumulate_product, product

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


def chunk_loss_and_logit_grad_(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t * CE(logits_t, label_t), with the logits overwritten by its gradient w * (softmax - onehot).

    logits (c, vocab) in the model's compute dtype (the caller's buffer; it holds the gradient afterwards);
    labels (c,) >= 0; token_weights (c,) fp32. Returns the fp32 loss sum. Written for torch.compile: Inductor
    makes it one reduction (max and sum of exp, reading the logits once) and one pointwise kernel (reading them
    again and writing the gradient in place), with no (c, vocab) fp32 tensor in memory. Eager, it is the
    reference the tests hold the compiled body to.
    """
    x = logits.float()  # (c, vocab)
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    target = x.gather(1, labels[:, None]).squeeze(1)  # (c,)
    total = ((lse - target) * token_weights).sum()
    vocab = torch.arange(x.shape[1], device=x.device)  # (vocab,)
    softmax = torch.exp(x - lse[:, None])  # (c, vocab)
    grad = torch.where(vocab[None, :] == labels[:, None], softmax - 1.0, softmax) * token_weights[:, None]
    logits.copy_(grad)
    return total


def chunk_loss_and_logit_grad_in_place_(logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor
                                        ) -> torch.Tensor:
    """chunk_loss_and_logit_grad_ without a compiler: the softmax formed in place (in the logits themselves when
    they are fp32, else in one fp32 copy written back)."""
    x = logits.float()  # (c, vocab); the logits themselves when they are fp32
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    target = x.gather(1, labels[:, None]).squeeze(1)  # (c,)
    total = ((lse - target) * token_weights).sum()
    grad = x.sub_(lse[:, None]).exp_()  # (c, vocab) softmax
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    grad.mul_(token_weights[:, None])
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)
    return total


# The chunk body by device type: torch.compile'd where Inductor generates GPU kernels (one reduction and one
# pointwise pass instead of about seven), the in-place eager body elsewhere (a CPU gains little and would pay
# the compilation in every short run and test). LIME_LOSS_COMPILE=0 keeps the eager body on GPUs too.
_BODIES: dict[str, object] = {}


def _chunk_body(device: torch.device):
    body = _BODIES.get(device.type)
    if body is None:
        wanted = device.type == "cuda" and os.environ.get("LIME_LOSS_COMPILE", "1") != "0"
        body = (torch.compile(chunk_loss_and_logit_grad_, fullgraph=True, dynamic=False) if wanted
                else chunk_loss_and_logit_grad_in_place_)
        _BODIES[device.type] = body
    return body


# The logits' gradient of a micro-batch is kept whole up to this size (lime-1b: 8,192 tokens of 50,000 bf16
# logits are 0.8 GB, 16,384 are 1.6 GB), so that the head's two gradient GEMMs run once over all of it; a larger
# micro-batch is cut into groups of that size, each adding its share into an fp32 weight gradient.
LOGIT_GRAD_BUDGET_BYTES = 4 * 2**30


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(hidden_t @ W^T, label_t), with its gradients computed in the forward.

    The logits are formed chunk by chunk (chunk_size tokens) into one buffer of the micro-batch, and each chunk's
    body overwrites its logits with their gradient; then dL/dhidden = G @ W and dL/dW = G^T @ hidden run once,
    so the (vocab, d) weight gradient is written once per micro-batch, not read and written again per chunk.
    Under autocast the head weight and the hidden states are cast to its dtype once per call (autocast would
    cast the weight again for every chunk's GEMM).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_size: int, need_hidden_grad: bool,
                need_weight_grad: bool):
        # hidden (n, d), weight (vocab, d), labels (n,) >= 0 (ignored positions carry weight 0), token_weights (n,) fp32
        n, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        compute_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = grad_weight = None
        with torch.autocast(device.type, enabled=False):
            h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)  # (n, d), (vocab, d): cast once
            if not (need_hidden_grad or need_weight_grad):
                for start in range(0, n, chunk_size):
                    logits = F.linear(h_all[start:start + chunk_size], w).float()  # (c, vocab)
                    y, t = labels[start:start + chunk_size], token_weights[start:start + chunk_size]
                    total += ((torch.logsumexp(logits, dim=-1) - logits.gather(1, y[:, None]).squeeze(1)) * t).sum()
                return total
            body = _chunk_body(device)
            chunks_per_group = LOGIT_GRAD_BUDGET_BYTES // (vocab * compute_dtype.itemsize) // chunk_size
            group = max(1, chunks_per_group) * chunk_size  # tokens whose logits' gradient is kept at once
            if need_hidden_grad:
                grad_hidden = torch.empty_like(hidden)  # (n, d)
            if need_weight_grad and group < n:  # several groups add into one fp32 buffer
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
            for group_start in range(0, n, group):
                h = h_all[group_start:group_start + group]  # (g, d)
                grads = torch.empty(h.shape[0], vocab, dtype=compute_dtype, device=device)  # (g, vocab)
                for start in range(0, h.shape[0], chunk_size):
                    rows = grads[start:start + chunk_size]  # (c, vocab): the chunk's logits, then their gradient
                    torch.mm(h[start:start + chunk_size], w.t(), out=rows)
                    offset = group_start + start
                    total += body(rows, labels[offset:offset + chunk_size], token_weights[offset:offset + chunk_size])
                if need_hidden_grad:
                    grad_hidden[group_start:group_start + group] = product(grads, w, hidden.dtype)  # (g, d)
                if need_weight_grad:
                    if grad_weight is None:  # the one group: written once, in the weight's dtype
                        grad_weight = product(grads.t(), h, weight.dtype)  # (vocab, d)
                    else:
                        accumulate_product(grad_weight, grads.t(), h)
                del grads
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
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
