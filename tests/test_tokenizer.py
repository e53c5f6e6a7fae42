"""The LIME tokenizer: lossless, special tokens, Hugging Face export with identical ids, foreign tokenizers."""

import json
import os
import random
import shutil

import pytest
from helpers import HARD_STRINGS, load_tool, train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, SPECIAL_TOKENS, load_tokenizer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_tiny_corpus(str(tmp_path_factory.mktemp("tok") / "corpus.jsonl"), num_docs=200)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"), corpus, vocab_size=600)


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f] + list(HARD_STRINGS)


def random_unicode_strings(n: int, seed: int = 0) -> list[str]:
    """Strings mixing ASCII, whitespace runs, the sentencepiece meta symbol, CJK, emoji and rare planes."""
    rng = random.Random(seed)
    alphabets = [
        "abcdefghijklmnopqrstuvwxyz ABC.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|0123456789",
        " \t\n\r\f\v\u00a0\u2000\u3000",
        "\u2581\u2581 \u2581",
        "中文字符日本語한국어",
        "😀👍🏽🇫🇷👨‍👩‍👧\u200d\ufe0f",
        "éèçñøß\u0301\u0308Ωжщ",
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.1:
                parts.append(chr(rng.randint(0x10000, 0x10FFFF) if rng.random() < 0.5 else rng.randint(0x80, 0xD7FF)))
            else:
                alphabet = rng.choice(alphabets)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def test_special_token_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 600
    assert (tok.pad_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.context_id) == (0, 1, 3, 4, 5)
    for token_id, piece in [(0, "<pad>"), (1, "<eos>"), (3, "<user>"), (4, "<assistant>"), (5, "<context>")]:
        assert tok.id_to_piece(token_id) == piece
    assert tok.path == tokenizer_dir


def test_lossless_round_trip(tokenizer_dir, texts):
    tok = load_tokenizer(tokenizer_dir)
    for text in texts + random_unicode_strings(300) + ["", " ", "\n", "  \n\t  ", "\u2581", "▁▁x ▁"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text[:80])
    # The pieces themselves cover spaces and newlines (not only byte fallback).
    assert len(tok.encode("the " * 50)) < 100


def test_encode_never_produces_special_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    special = {tok.pad_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.context_id}
    text = "".join(SPECIAL_TOKENS.as_list()) + " text <eos> more <user> x <assistant> y <context>"
    ids = tok.encode(text)
    assert not special & set(ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "abc"]) == [ids, tok.encode("abc")]


def test_hugging_face_files_give_identical_ids(tokenizer_dir, texts):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert len(hf) == tok.vocab_size
    mismatches = []
    for text in texts + random_unicode_strings(100, seed=1):
        expected = tok.encode(text)
        has_special_strings = any(s in text for s in SPECIAL_TOKENS.as_list())
        # Users call hf(text) with defaults; text containing "<eos>" etc. is the one case that differs by design.
        got = hf(text, split_special_tokens=has_special_strings)["input_ids"]
        if got != expected:
            mismatches.append(text[:60])
        assert hf.decode(expected) == text
    assert not mismatches, f"{len(mismatches)} documents tokenized differently, e.g. {mismatches[:3]}"


def test_hugging_face_prompt_maps_tags_to_single_ids(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    question = "What does os.path.join do?"
    ids = hf("<user>" + question + "<assistant>")["input_ids"]
    assert ids == [tok.user_id] + tok.encode(question) + [tok.assistant_id]
    ids = hf("<context>some context<user>q<assistant>")["input_ids"]
    assert ids[0] == tok.context_id and tok.user_id in ids
    assert hf.decode([tok.user_id, *tok.encode("hi"), tok.eos_id], skip_special_tokens=True) == "hi"


def test_save_hf_and_load_hf_directory(tokenizer_dir, tmp_path, texts):
    tok = load_tokenizer(tokenizer_dir)
    out = str(tmp_path / "hf")
    tok.save_hf(out)
    assert not os.path.exists(os.path.join(out, "tokenizer.model"))
    hf_tok = load_tokenizer(out)
    assert isinstance(hf_tok, HuggingFaceTokenizer)
    assert hf_tok.special_ids() == tok.special_ids()
    assert hf_tok.vocab_size == tok.vocab_size
    for text in texts[:50] + [HARD_STRINGS[7]]:
        assert hf_tok.encode(text) == tok.encode(text)  # special strings stay text here too
    assert hf_tok.encode_batch(texts[:5]) == tok.encode_batch(texts[:5])
    # Exporting again from the Hugging Face side copies the files.
    again = str(tmp_path / "hf2")
    hf_tok.save_hf(again)
    assert load_tokenizer(again).encode(texts[0]) == tok.encode(texts[0])


def test_users_own_sentencepiece_model(texts, tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "user")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=400,
                                   model_type="unigram", minloglevel=2)
    tok = load_tokenizer(prefix + ".model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.eos_id == 2 and tok.pad_id == tok.eos_id  # default sentencepiece: </s> = 2, no pad
    assert tok.user_id is None and tok.assistant_id is None and tok.context_id is None
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ValueError, match="only sentencepiece BPE"):
        tok.save_hf(str(tmp_path / "hf"))


def test_train_tokenizer_tool_sampling_and_errors(corpus, tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    out = str(tmp_path / "sampled")
    assert tool.main(["--input", corpus, "--output-dir", out, "--vocab-size", "400",
                      "--num-documents", "50", "--sample-fraction", "0.5", "--seed", "3"]) == 0
    with open(os.path.join(out, "tokenizer_info.json")) as f:
        info = json.load(f)
    assert info["trained_on_documents"] == 50 and info["vocab_size"] == 400
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    assert tool.main(["--input", str(bad), "--output-dir", str(tmp_path / "x"), "--vocab-size", "300"]) == 1
    assert f"{bad}: line 2: key 'text' is int" in capsys.readouterr().err


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model and no tokenizer.json"):
        load_tokenizer(str(empty))


def test_hf_directory_copied_without_sentencepiece(tokenizer_dir, tmp_path):
    only_hf = tmp_path / "only_hf"
    only_hf.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), only_hf / name)
    tok = load_tokenizer(str(only_hf))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.eos_id == 1 and tok.user_id == 3


def test_train_tokenizer_from_parquet_and_text_with_byte_budget(texts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[:100]}), tmp_path / "part.parquet")
    (tmp_path / "notes.txt").write_text("\n".join(texts[100:150]), encoding="utf-8")
    out = str(tmp_path / "tok")
    budget = 100_000
    assert load_tool("train_tokenizer").main(["--input", str(tmp_path / "part.parquet"), str(tmp_path / "notes.txt"),
                                              "--output-dir", out, "--vocab-size", "400", "--max-bytes", str(budget)]) == 0
    with open(os.path.join(out, "tokenizer_info.json")) as f:
        info = json.load(f)
    # Documents are taken until the byte budget is reached (the last one may cross it).
    sizes = [len(t.encode("utf-8")) for t in texts[:100]]
    expected = next(i + 1 for i in range(len(sizes)) if sum(sizes[:i + 1]) >= budget)
    assert info["trained_on_documents"] == expected
    assert load_tokenizer(out).decode(load_tokenizer(out).encode(texts[120])) == texts[120]
