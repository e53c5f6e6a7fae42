"""The LIME model: shapes, causality, positions, parameter count, tying, attention paths, packing."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lime.config import PRESETS, LimeConfig
from megatron_lime.model import LimeModel, sinusoid_table
from megatron_lime.model.attention import document_attention_mask


@pytest.fixture
def tiny() -> LimeModel:
    torch.manual_seed(0)
    return LimeModel(LimeConfig.from_name("lime-tiny"))


def test_presets_match_the_model_card():
    c = LimeConfig.from_name("lime-1b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.ffn_hidden_size) == (32, 1536, 24, 6144)
    assert (c.vocab_size, c.max_position_embeddings, c.head_dim) == (50_000, 512, 64)
    t = LimeConfig.from_name("lime-tiny")
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.ffn_hidden_size) == (2, 64, 4, 256)
    assert set(PRESETS) >= {"lime-1b", "lime-tiny", "lime-125m"}


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=100, num_attention_heads=3), "divisible by num_attention_heads"),
    (dict(num_layers=0), "num_layers must be positive"),
    (dict(attention_backend="xformers"), "attention_backend"),
])
def test_config_validation_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        LimeConfig.from_name("lime-tiny", **bad)
    with pytest.raises(ValueError, match="unknown model preset 'lime-2b'"):
        LimeConfig.from_name("lime-2b")


def test_lime_1b_on_meta_has_the_cards_parameter_count():
    config = LimeConfig.from_name("lime-1b")
    with torch.device("meta"):
        model = LimeModel(config)
    count = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert abs(count - 0.983e9) / 0.983e9 < 0.005
    assert count == config.num_parameters()


def test_meta_model_materialises_with_init_weights():
    config = LimeConfig.from_name("lime-tiny")
    with torch.device("meta"):
        model = LimeModel(config)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.position_table, sinusoid_table(config.max_position_embeddings, config.hidden_size))
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long)).logits).all()


def test_tied_head_is_one_tensor(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert names.count("tok_embeddings.weight") == 1
    assert not any("lm_head" in n for n in names)
    assert tiny.lm_head_weight is tiny.tok_embeddings.weight
    assert "position_table" not in tiny.state_dict()
    # A change to the embedding changes the output projection too.
    ids = torch.randint(0, 512, (1, 6))
    before = tiny(ids).logits
    with torch.no_grad():
        tiny.tok_embeddings.weight[7] += 1.0
    assert not torch.allclose(tiny(ids).logits[..., 7], before[..., 7])


def test_initialisation_scales_residual_projections(tiny):
    config = tiny.config
    residual_std = config.init_std / math.sqrt(2 * config.num_layers)
    big = LimeModel(LimeConfig.from_name("lime-tiny", hidden_size=256, ffn_hidden_size=1024))
    assert big.layers[0].mlp.fc_out.weight.std().item() == pytest.approx(
        config.init_std / math.sqrt(2 * big.config.num_layers), rel=0.05)
    assert big.layers[0].attention.qkv.weight.std().item() == pytest.approx(config.init_std, rel=0.05)
    assert residual_std < config.init_std


def test_forward_backward_and_loss(tiny):
    ids = torch.randint(0, 512, (3, 17))
    labels = torch.randint(0, 512, (3, 17))
    out = tiny(ids, labels=labels)
    assert out.logits is None  # the default chunked loss never materialises them
    logits = tiny(ids).logits
    assert logits.shape == (3, 17, 512)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, expected)
    assert out.num_loss_tokens.item() == 3 * 17
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters())
    # The initial loss of a fresh model is close to ln(vocab).
    assert abs(out.loss.item() - math.log(512)) < 0.5


def test_loss_mask_and_ignore_index(tiny):
    ids = torch.randint(0, 512, (2, 10))
    labels = torch.randint(0, 512, (2, 10))
    mask = torch.zeros(2, 10)
    mask[:, 5:] = 1
    labels[0, 9] = -100
    out = tiny(ids, labels=labels, loss_mask=mask)
    per_token = F.cross_entropy(tiny(ids).logits.flatten(0, 1), labels.flatten().clamp(min=0),
                                reduction="none").view(2, 10)
    keep = mask.bool() & (labels != -100)
    torch.testing.assert_close(out.loss, per_token[keep].mean())
    assert out.num_loss_tokens.item() == keep.sum().item()
    total = tiny(ids, labels=labels, loss_mask=mask, loss_reduction="sum").loss
    torch.testing.assert_close(total, per_token[keep].sum())


def test_causality(tiny):
    ids = torch.randint(0, 512, (1, 20))
    reference = tiny(ids).logits
    for t in (0, 7, 19):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 512
        logits = tiny(changed).logits
        torch.testing.assert_close(logits[:, :t], reference[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, t], reference[:, t])


def test_sinusoid_table_matches_its_formula():
    d, positions = 64, 512
    table = sinusoid_table(positions, d)
    for p in (0, 1, 37, 511):
        for i in (0, 1, 15, 31):
            w = 10_000 ** (-2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p * w), abs=1e-6)


def test_position_ids_default_and_explicit_agree(tiny):
    ids = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(tiny(ids).logits, tiny(ids, position_ids=torch.arange(12).expand(2, 12)).logits)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        tiny(torch.zeros(1, 129, dtype=torch.long))


def test_sdpa_path_equals_naive_attention(tiny):
    attention = tiny.layers[0].attention
    x = torch.randn(2, 9, 64)
    b, s, d = x.shape
    q, k, v = attention.qkv(x).view(b, s, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (b, h, s, hd) each
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    naive = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    torch.testing.assert_close(attention(x), attention.out_proj(naive), rtol=1e-5, atol=1e-6)


def test_document_mask_keeps_packed_sequences_apart(tiny):
    first = torch.randint(0, 512, (1, 7))
    second = torch.randint(0, 512, (1, 5))
    packed = torch.cat((first, second), dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    logits = tiny(packed, position_ids=position_ids, document_ids=document_ids).logits
    torch.testing.assert_close(logits[:, :7], tiny(first).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 7:], tiny(second).logits, rtol=1e-5, atol=1e-5)
    mask = document_attention_mask(document_ids)[0, 0]
    assert mask[8, 6].item() is False and mask[8, 7].item() is True and mask[3, 4].item() is False


def test_bf16_autocast_forward_on_cpu(tiny):
    ids = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(ids, labels=ids)
        logits = tiny(ids).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(logits.float(), tiny(ids).logits, rtol=0.1, atol=0.1)
    tiny.config.loss_chunk_size = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(tiny(ids, labels=ids).loss, out.loss)


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    ids = torch.randint(0, 512, (2, 8))
    tiny(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()
    tiny.activation_checkpointing = True
    tiny(ids, labels=ids).loss.backward()
    for a, p in zip(plain, tiny.parameters()):
        torch.testing.assert_close(p.grad, a)
