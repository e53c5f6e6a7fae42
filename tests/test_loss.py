"""The chunked cross-entropy over the tied head equals the loss from materialised logits (fp32, 1e-6 relative):
loss, gradient of the hidden states and of the head weight, with -100 labels, a loss mask and both reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lime.config import LimeConfig
from megatron_lime.model import LimeModel, chunked_language_model_loss, language_model_loss



def assert_same(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Equal to 1e-6 relative: per element, and in absolute terms against the tensor's largest entry (an entry
    that is a near-cancelling sum of fp32 terms has no meaningful per-element relative error)."""
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def inputs(b=3, s=37, d=24, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    loss_mask = (torch.rand(b, s, generator=g) > 0.3).float()
    loss_mask[1, 5] = 0.25  # a fractional weight
    return hidden, weight, labels, loss_mask


def loss_and_grads(loss_fn, hidden, weight):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss, count = loss_fn(hidden, weight)
    loss.backward()
    return loss.detach(), count, hidden.grad, weight.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 16, 111, 4096])  # one token, uneven chunks, exactly all, more than all
@pytest.mark.parametrize("with_mask", [True, False])
def test_chunked_loss_and_gradients_equal_the_materialised_ones(reduction, chunk_size, with_mask):
    hidden, weight, labels, loss_mask = inputs()
    mask = loss_mask if with_mask else None
    expected = loss_and_grads(lambda h, w: language_model_loss(F.linear(h, w), labels, mask, reduction), hidden, weight)
    got = loss_and_grads(lambda h, w: chunked_language_model_loss(h, w, labels, mask, reduction, chunk_size),
                         hidden, weight)
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert got[1].item() == ((labels != -100).float() * (loss_mask if with_mask else 1)).sum().item()


def test_incoming_gradient_scales_the_stored_ones_and_no_grad_skips_them():
    hidden, weight, labels, loss_mask = inputs()
    got = loss_and_grads(lambda h, w: (lambda loss, c: (3.5 * loss, c))(
        *chunked_language_model_loss(h, w, labels, loss_mask, "sum", 8)), hidden, weight)
    expected = loss_and_grads(lambda h, w: (lambda loss, c: (3.5 * loss, c))(
        *language_model_loss(F.linear(h, w), labels, loss_mask, "sum")), hidden, weight)
    for g, e in zip(got, expected):
        assert_same(g, e)
    with torch.no_grad():
        loss, _ = chunked_language_model_loss(hidden, weight, labels, loss_mask, "mean", 8)
    assert_same(loss, language_model_loss(F.linear(hidden, weight), labels, loss_mask)[0].detach())
    # A frozen head gets no gradient and the hidden states still get theirs.
    frozen = weight.detach()
    h = hidden.detach().requires_grad_()
    chunked_language_model_loss(h, frozen, labels, loss_mask, "mean", 8)[0].backward()
    assert_same(h.grad, loss_and_grads(lambda h2, w2: language_model_loss(F.linear(h2, frozen), labels, loss_mask),
                                       hidden, weight)[2])


def test_model_with_chunked_loss_gives_the_same_loss_and_gradients():
    """Through the whole model: loss, the tied embedding's gradient (lookup + head) and every other gradient."""
    torch.manual_seed(0)
    model = LimeModel(LimeConfig.from_name("lime-tiny", loss_chunk_size=0))
    ids = torch.randint(0, 512, (3, 29))
    labels = torch.randint(0, 512, (3, 29))
    labels[1, :10] = -100
    loss_mask = (torch.rand(3, 29) > 0.2).float()
    results = []
    for chunk in (0, 10):
        model.config.loss_chunk_size = chunk
        model.zero_grad()
        out = model(ids, labels=labels, loss_mask=loss_mask, loss_reduction="sum")
        assert (out.logits is None) == bool(chunk)
        out.loss.backward()
        results.append((out.loss.detach(), out.num_loss_tokens, [p.grad.clone() for p in model.parameters()]))
    (loss0, count0, grads0), (loss1, count1, grads1) = results
    assert_same(loss1, loss0)
    assert count0.item() == count1.item()
    for got, expected in zip(grads1, grads0):
        assert_same(got, expected)


def test_bad_arguments_say_what_is_wrong():
    hidden, weight, labels, _ = inputs()
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        chunked_language_model_loss(hidden, weight, labels, None, "max")
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        chunked_language_model_loss(hidden, weight, labels, None, "mean", 0)
    with pytest.raises(ValueError, match="loss_chunk_size must be 0"):
        LimeConfig.from_name("lime-tiny", loss_chunk_size=-1)
