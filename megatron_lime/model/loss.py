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
"""

from __future__ import annotations

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
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]  # (c, d)
            y = labels[start:start + chunk_size]  # (c,)
            w = token_weights[start:start + chunk_size]  # (c,)
            # Logits in the model's dtype, then fp32: exactly what the unchunked path computes.
            logits = F.linear(h, weight).float()  # (c, vocab)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            target = logits.gather(1, y[:, None]).squeeze(1)  # (c,)
            total += ((lse - target) * w).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d/dlogits of w * (lse - logit[y]) = w * (softmax - onehot(y)), formed in place in the logits.
            grad_logits = logits.sub_(lse[:, None]).exp_()  # (c, vocab) softmax
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_logits.mul_(w[:, None])
            grad_logits = grad_logits.to(hidden.dtype)  # the unchunked backward casts it the same way
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight  # (c, d)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()  # (vocab, d), accumulated in fp32
            del logits, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)
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
