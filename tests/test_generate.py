"""Generation: the model card's exact snippet on an export, the KV cache, left padding, tools/generate.py."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import load_tool, train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.config import LimeConfig
from megatron_lime.checkpoint import write_consolidated
from megatron_lime.conversion.generation import DecodingSettings, TokenStreamer, load_generator
from megatron_lime.model import LimeModel

CARD_KWARGS = dict(max_new_tokens=128, num_beams=4, early_stopping=True, repetition_penalty=1.15,
                   no_repeat_ngram_size=3, min_new_tokens=16, do_sample=False, top_p=None, temperature=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """lime-tiny with room for the card's 128 new tokens (256 positions), as a checkpoint and a bf16 export."""
    root = tmp_path_factory.mktemp("generate")
    tokenizer_dir = train_tiny_tokenizer(str(root / "tokenizer"), write_tiny_corpus(str(root / "corpus.jsonl")))
    torch.manual_seed(0)
    config = LimeConfig.from_name("lime-tiny", max_position_embeddings=256)
    model = LimeModel(config)
    with torch.no_grad():  # a sharper output distribution than the init's, so decoding choices matter
        model.tok_embeddings.weight.mul_(8.0)
    write_consolidated(root / "ckpt", model.state_dict(), {"model": config.to_dict(), "tokenizer": tokenizer_dir})
    assert load_tool("convert_to_hf").main(["--load", str(root / "ckpt"), "--output", str(root / "hf")]) == 0
    return dict(root=root, ckpt=root / "ckpt", hf=root / "hf", tokenizer=tokenizer_dir)


def card_model(path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, trust_remote_code=True)
    return tokenizer, model


def test_the_model_cards_snippet_runs(exported):
    tokenizer, model = card_model(exported["hf"], torch.bfloat16)
    assert model.dtype == torch.bfloat16

    def build_prompt(question):
        uid = "<user>"
        aid = "<assistant>"
        return uid + question + aid

    prompt = build_prompt("Write five questions for a Data Scientist interview.")
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    input_length = inputs["input_ids"].shape[1]
    outputs = model.generate(**inputs, **CARD_KWARGS, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    generated_tokens = outputs[0][input_length:]
    output = tokenizer.decode(generated_tokens, skip_special_tokens=True)
    assert 16 <= len(generated_tokens) <= 128
    assert inputs["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids("<user>")
    assert isinstance(output, str) and output


@pytest.mark.parametrize("decoding", ["card", "greedy"])
def test_kv_cache_gives_the_same_tokens_as_no_cache(exported, decoding):
    tokenizer, model = card_model(exported["hf"], torch.float32)
    inputs = tokenizer("<user>How do I sort a list?<assistant>", return_tensors="pt")
    kwargs = CARD_KWARGS if decoding == "card" else dict(max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                                         num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    kwargs = dict(kwargs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    query_lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kw: query_lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    with_cache = model.generate(**inputs, **kwargs)
    hook.remove()
    without_cache = model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    # The cache is really used: after the prompt, one new token per forward (a model that ignores
    # the cache generate passes would get the whole sequence every step, or wrong tokens).
    assert query_lengths[0] == inputs["input_ids"].shape[1] and set(query_lengths[1:]) == {1}


def test_left_padded_batch_generates_what_each_prompt_does_alone(exported):
    tokenizer, model = card_model(exported["hf"], torch.float32)
    prompts = ["<user>Hi<assistant>", "<user>Explain the heapq module in one long sentence, please.<assistant>"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=1, repetition_penalty=1.0,
                  no_repeat_ngram_size=0,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    together = model.generate(**batch, **kwargs)
    for row, prompt in enumerate(prompts):
        single = tokenizer(prompt, return_tensors="pt")
        new_alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1]:]
        new_together = together[row, batch["input_ids"].shape[1]:]
        assert len(new_alone) == 24 and new_together.tolist() == new_alone.tolist()


def test_context_beyond_max_positions_is_a_clear_error(exported):
    _, model = card_model(exported["hf"], torch.float32)
    with pytest.raises(ValueError, match="beyond max_position_embeddings=256"):
        model(input_ids=torch.zeros(1, 257, dtype=torch.long))


def test_checkpoint_and_export_generate_the_same_tokens(exported):
    from_checkpoint = load_generator(exported["ckpt"])
    from_export = load_generator(exported["hf"])
    settings = DecodingSettings(strategy="greedy", max_new_tokens=20, min_new_tokens=20)
    for prompt, context in (("What is a deque?", None), ("Which module?", "The collections module has deque.")):
        a = from_checkpoint.generate(prompt, settings, context=context)
        b = from_export.generate(prompt, settings, context=context)
        assert a == b and len(a) == 20
    # bf16 export vs fp32 checkpoint: same weights (bf16-exact in this test), same template ids.
    assert from_checkpoint.encode_prompt("Hi", "ctx", False) == from_export.encode_prompt("Hi", "ctx", False)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_generate_tool_prints_the_generated_text(exported, capsys, strategy):
    generate = load_tool("generate")
    assert generate.main(["--load", str(exported["ckpt"]), "--prompt", "Name a module.", "--strategy", strategy,
                          "--max-new-tokens", "12", "--num-beams", "3", "--seed", "7"]) == 0
    printed = capsys.readouterr()
    generator = load_generator(exported["ckpt"])
    torch.manual_seed(7)
    settings = DecodingSettings(strategy=strategy, max_new_tokens=12, num_beams=3)
    expected = generator.decode(generator.generate("Name a module.", settings))
    assert printed.out == expected + "\n"
    assert "tokens/s" in printed.err


def test_generate_tool_reports_a_missing_checkpoint(tmp_path, capsys):
    assert load_tool("generate").main(["--load", str(tmp_path / "none"), "--prompt", "x"]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_streamer_prints_each_token_and_holds_back_split_characters():
    # Tokens 3 and 4 are the two halves of an emoji's bytes (as byte-fallback tokens are): token 3
    # alone decodes to U+FFFD, and only 3 followed by 4 decodes to the character.
    pieces = {1: "Hel", 2: "lo ", 3: "\ufffd"}

    def decode(ids):
        text = "".join(pieces[i] for i in ids if i != 4)
        return text.replace("\ufffd", "\U0001f600") if 4 in ids else text

    out = io.StringIO()
    streamer = TokenStreamer(decode, out)
    streamer.put(torch.tensor([[9, 9]]))  # the prompt: not printed
    writes = []
    for token in (1, 2, 3, 4):
        streamer.put(torch.tensor([token]))
        writes.append(out.getvalue())
    streamer.end()
    assert writes == ["Hel", "Hello ", "Hello ", "Hello \U0001f600"]
    assert out.getvalue() == "Hello \U0001f600\n"


def test_card_decoding_is_one_constant_used_by_the_card_the_export_and_the_tool(exported):
    import json

    from megatron_lime.conversion.card import CARD_DECODING

    assert CARD_DECODING == CARD_KWARGS
    card = (exported["hf"] / "README.md").read_text()
    assert all(f"{name}={value!r}" in card for name, value in CARD_DECODING.items())
    saved = json.loads((exported["hf"] / "generation_config.json").read_text())
    assert all(saved[name] == value for name, value in CARD_DECODING.items()
               if value is not None and name != "min_new_tokens")
    card_kwargs = DecodingSettings(strategy="card").generate_kwargs(pad_id=0, eos_id=1)
    assert {k: card_kwargs[k] for k in CARD_DECODING} == CARD_DECODING
