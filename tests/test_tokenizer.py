"""The LIME tokenizer: lossless, special tokens, Hugging Face export with identical ids, foreign tokenizers."""

import json
import os
import pickle
import random
import shutil

import pytest
from helpers import HARD_STRINGS, load_tool, train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.data import preprocess as preprocess_data
from megatron_lime.data.sft import preprocess as preprocess_sft_data
from megatron_lime.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, SPECIAL_TOKENS, TokenizerSpec,
                                     build_tokenizer, load_tokenizer)


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


def test_lossless_model_encodes_word_by_word_with_sentencepiece_own_ids(tokenizer_dir, texts):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from megatron_lime.tokenizer.agreement import lossless_router, word_split_obstacle

    tok = load_tokenizer(tokenizer_dir)
    assert word_split_obstacle(tok.proto()) is None and tok.router is not None
    rng = random.Random(5)
    words = sorted({w for t in texts for w in t.split()})
    glued = ["".join(rng.choice(words) + rng.choice(["", " ", "  ", "    ", "\n", "\t", "\n    ", " \n ", "\u2581 "])
                     for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    batch = texts + random_unicode_strings(1000, seed=9) + glued + ["", " ", "   ", " a", "a ", "  a  b  ", "\u2581 x"]
    assert tok.encode_batch(batch) == tok.processor.encode(batch)  # each new word learnt, then put together
    assert tok.encode_batch(batch) == tok.processor.encode(batch)  # every word known
    assert tok.encode_batch(["  a  bc d", "x  "]) == tok.processor.encode(["  a  bc d", "x  "])
    ids, status, new_words, _ = tok.router.encode(["  a  bc d", "x  "])
    assert status == [0, 0] and new_words == [] and ids == tok.processor.encode(["  a  bc d", "x  "])
    fresh = lossless_router(tok.proto())
    assert fresh.encode(["  a  bc d"])[2] == ["  a", "  bc", " d"]  # a word: spaces, then the rest up to a space
    clone = pickle.loads(pickle.dumps(tok))  # the compiled cache is not pickled; it is rebuilt
    assert clone.encode_batch(batch[:50]) == tok.processor.encode(batch[:50])

    def obstacle(edit) -> str | None:
        proto = sp_pb2.ModelProto()
        proto.CopyFrom(tok.proto())
        edit(proto)
        return word_split_obstacle(proto)

    def space_inside(proto):
        piece = next(p for p in proto.pieces if p.type == sp_pb2.ModelProto.SentencePiece.NORMAL and len(p.piece) > 2
                     and " " not in p.piece)
        piece.piece = piece.piece[0] + " " + piece.piece[1:]

    assert "a space after another character" in obstacle(space_inside)
    assert "normalises" in obstacle(lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", True))
    assert "user-defined" in obstacle(lambda p: setattr(p.pieces[-1], "type",
                                                         sp_pb2.ModelProto.SentencePiece.USER_DEFINED))


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


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_standard_sentencepiece_model_exports_with_identical_ids(texts, tmp_path, model_type):
    """sentencepiece's defaults (nmt_nfkc normalisation, dummy prefix, whitespace escaping, extra
    whitespace removed), as LLaMA-style models have them: the export reproduces every id."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    prefix = str(tmp_path / "user")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=400,
                                   model_type=model_type, minloglevel=2)
    tok = build_tokenizer(TokenizerSpec(tokenizer_model=prefix + ".model"))
    assert isinstance(tok, HuggingFaceTokenizer)  # in its converted form: see SentencePieceTokenizer
    assert tok.eos_id == 2 and tok.pad_id == tok.eos_id  # default sentencepiece: </s> = 2, no pad
    assert tok.user_id is None and tok.assistant_id is None and tok.context_id is None
    out = str(tmp_path / "hf")
    tok.save_hf(out)
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == "</s>" and hf.eos_token_id == 2
    probes = texts + random_unicode_strings(100, seed=2)
    mismatches = [(text, hf.convert_ids_to_tokens(hf(text, add_special_tokens=False)["input_ids"]),
                   [tok.id_to_piece(i) for i in tok.encode(text)]) for text in probes
                  if hf(text, add_special_tokens=False)["input_ids"] != tok.encode(text)]
    assert not mismatches, f"{len(mismatches)} texts tokenized differently, e.g. {mismatches[:1]}"


def test_unsupported_sentencepiece_model_is_refused_at_load(texts, tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "words")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=400,
                                   model_type="word", minloglevel=2)
    with pytest.raises(ValueError, match="WORD model has no Hugging Face equivalent"):
        build_tokenizer(TokenizerSpec(tokenizer_model=prefix + ".model"))
    tool = preprocess_data
    corpus = write_tiny_corpus(str(tmp_path / "c.jsonl"), num_docs=5)
    assert tool.main(["--input", corpus, "--tokenizer-model", prefix + ".model",
                      "--output-prefix", str(tmp_path / "out"), "--workers", "1"]) != 0
    assert not os.path.exists(str(tmp_path / "out_text_document.bin"))


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
    with pytest.raises(FileNotFoundError, match="no tokenizer.model, no tokenizer.json"):
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
                                              "--output-dir", out, "--vocab-size", "400",
                                              "--max-bytes", str(budget)]) == 0
    with open(os.path.join(out, "tokenizer_info.json")) as f:
        info = json.load(f)
    # Documents are taken until the byte budget is reached (the last one may cross it).
    sizes = [len(t.encode("utf-8")) for t in texts[:100]]
    expected = next(i + 1 for i in range(len(sizes)) if sum(sizes[:i + 1]) >= budget)
    assert info["trained_on_documents"] == expected
    assert load_tokenizer(out).decode(load_tokenizer(out).encode(texts[120])) == texts[120]


# ---------------------------------------------------------------------------------------
# Every kind of tokenizer, raw text -> preprocessing -> SFT training -> Hugging Face folder.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tokenizer(kind: str, corpus: str, texts: list[str], out: str) -> list[str]:
    """Train a tokenizer of `kind` in `out`; returns the tokenizer flags every tool takes for it."""
    if kind == "lime":  # ours: lossless, has the chat tags
        return ["--tokenizer-model", train_tiny_tokenizer(out, corpus, vocab_size=512)]
    if kind.startswith("sentencepiece"):  # sentencepiece's defaults: unigram, nmt_nfkc, dummy prefix, </s>, no chat
        import sentencepiece as spm  # tags; -bpe: a BPE model with byte fallback, as LLaMA's (the word-by-word path)

        os.makedirs(out)
        bpe = {"model_type": "bpe", "byte_fallback": True} if kind == "sentencepiece-bpe" else {}
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=os.path.join(out, "sp"),
                                       vocab_size=400, minloglevel=2, num_threads=1, **bpe)
        return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(out, "sp.model")]
    # A byte-level BPE tokenizer.json (GPT-2 style) with 600 ids: the chat tags make 603, more than
    # lime-tiny's 512 rows, so training grows the vocabulary.
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  show_progress=False)
    os.makedirs(out)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    tokenizer.save_model(out)  # vocab.json + merges.txt, for GPT2BPETokenizer
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    if kind == "gpt2-files":
        return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(out, "vocab.json"),
                "--merge-file", os.path.join(out, "merges.txt")]
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", out]


@pytest.mark.parametrize("kind", ["lime", "sentencepiece", "sentencepiece-bpe", "bytelevel-bpe"])
def test_each_tokenizer_kind_from_raw_text_to_a_hugging_face_folder(kind, tmp_path, capsys):
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from megatron_lime.data.indexed_dataset import IndexedDataset
    from megatron_lime.data.sft.template import SFTExample, Turn, render_examples
    from megatron_lime.sample_data import write_instruction_set

    corpus = write_tiny_corpus(str(tmp_path / "corpus.jsonl"), num_docs=60)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    flags = make_tokenizer(kind, corpus, texts, str(tmp_path / "tokenizer"))

    # Pretraining data, then SFT data (the chat tags added as new ids when the tokenizer lacks them).
    assert preprocess_data.main(["--input", corpus, "--output-prefix", str(tmp_path / "pre"), *flags,
                                              "--append-eod", "--workers", "1", "--quiet"]) == 0
    write_instruction_set(str(tmp_path / "dolly.jsonl"), max_examples=60)
    dolly = tmp_path / "dolly.jsonl"
    (tmp_path / "m.yaml").write_text(f"seq_length: 64\nover_length: truncate\ndatasets:\n"
                                     f"  - {{name: databricks/databricks-dolly-15k, path: {dolly}}}\n")
    capsys.readouterr()
    assert preprocess_sft_data.main(["--mixture", str(tmp_path / "m.yaml"), *flags,
                                                  "--output-prefix", str(tmp_path / "sft"), "--quiet"]) == 0
    added = "lacks <user>, <assistant>, <context>: added as new special ids" in capsys.readouterr().out
    assert added == (kind != "lime")
    tokenizer = build_tokenizer(TokenizerSpec.from_args(type("A", (), {
        "tokenizer_type": None, "tokenizer_model": None, "vocab_file": None, "merge_file": None,
        **{flag.lstrip("-").replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])}})()),
        chat_tokens=True)
    if kind == "sentencepiece-bpe":  # the data above was encoded word by word where sentencepiece agrees
        assert tokenizer.agreement.usable and sum(tokenizer.by_sentencepiece(texts)) > len(texts) // 2

    if kind == "lime":  # the path every other training test takes: a checkpoint written here is enough
        import torch

        from megatron_lime import LimeConfig, LimeModel
        from megatron_lime.checkpoint import write_consolidated

        config = LimeConfig.from_name("lime-tiny")
        torch.manual_seed(0)
        write_consolidated(tmp_path / "ckpt", LimeModel(config).state_dict(),
                           {"model": config.to_dict(), "tokenizer": flags[-1], "dataset_type": "sft", "args": {}})
    else:  # a few SFT steps from scratch on lime-tiny (512 rows), one process
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
        result = subprocess.run(
            [sys.executable, os.path.join(REPO, "pretrain_lime.py"), "--model", "lime-tiny", "--seq-length", "64",
             "--data-path", str(tmp_path / "sft_text_document"), *flags, "--dataset-type", "sft",
             "--save", str(tmp_path / "ckpt"), "--train-iters", "2", "--micro-batch-size", "2",
             "--global-batch-size", "2", "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0",
             "--split", "100,0,0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        assert "lacks <user>, <assistant>, <context>: added as new special ids" in result.stdout
        grown = "the model's vocabulary is sized to fit the tokenizer: 512 -> 640 rows (603 ids" in result.stdout
        assert grown == (kind == "bytelevel-bpe"), result.stdout[-3000:]

    assert load_tool("convert_to_hf").main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                                            "--dtype", "fp32"]) == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["vocab_size"] == (640 if kind == "bytelevel-bpe" else 512)

    # The exported tokenizer gives exactly the ids preprocessing wrote, document by document.
    documents = IndexedDataset(str(tmp_path / "pre_text_document"))
    assert len(documents) == len(texts)
    for text, written in zip(texts, documents):
        assert hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id] == written.tolist()

    # Chat: the template renders what SFT trained on, tags as single ids, replies ended by the tokenizer's own eos.
    eos = {"lime": "<eos>", "bytelevel-bpe": "<|endoftext|>"}.get(kind, "</s>")
    assert hf.eos_token == eos and hf.eos_token_id == tokenizer.eos_id
    example = SFTExample(turns=(Turn("What does heapq do?", "It keeps a heap."), Turn("And bisect?", "Sorted lists.")))
    messages = [{"role": role, "content": content} for turn in example.turns
                for role, content in (("user", turn.user), ("assistant", turn.assistant))]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == (f"<user>What does heapq do?<assistant>It keeps a heap.{eos}"
                        f"<user>And bisect?<assistant>Sorted lists.{eos}")
    chat_ids = hf(rendered, add_special_tokens=False)["input_ids"]
    assert chat_ids == render_examples([example], tokenizer)[0].token_ids
    assert [hf.convert_tokens_to_ids(t) for t in ("<user>", "<assistant>", "<context>")] == \
        [tokenizer.user_id, tokenizer.assistant_id, tokenizer.context_id]
    sft_examples = IndexedDataset(str(tmp_path / "sft_text_document"))
    assert sft_examples[0].tolist()[0] in (tokenizer.user_id, tokenizer.context_id)


def test_gpt2_bpe_files_give_the_same_ids_as_their_tokenizer_json(tmp_path):
    corpus = write_tiny_corpus(str(tmp_path / "corpus.jsonl"), num_docs=30)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    flags = make_tokenizer("gpt2-files", corpus, texts, str(tmp_path / "tokenizer"))
    for name, tool_flags in (("files", flags), ("json", ["--tokenizer-model", str(tmp_path / "tokenizer"),
                                                          "--tokenizer-type", "HuggingFaceTokenizer"])):
        assert preprocess_data.main(["--input", corpus, "--output-prefix", str(tmp_path / name),
                                                  *tool_flags, "--append-eod", "--workers", "1", "--quiet"]) == 0
    for suffix in (".bin", ".idx"):
        with open(tmp_path / f"files_text_document{suffix}", "rb") as a, \
                open(tmp_path / f"json_text_document{suffix}", "rb") as b:
            assert a.read() == b.read()
    with pytest.raises(ValueError, match="needs --vocab-file"):
        build_tokenizer(TokenizerSpec(tokenizer_type="GPT2BPETokenizer"))


def test_chat_tokens_are_new_ids_that_text_never_produces(texts, tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=300,
                                   minloglevel=2, num_threads=1)
    base = load_tokenizer(prefix + ".model")
    chat = base.with_chat_tokens()
    assert (chat.user_id, chat.assistant_id, chat.context_id) == (300, 301, 302) and chat.vocab_size == 303
    assert chat.added_chat_tokens == ("<user>", "<assistant>", "<context>")
    for text in texts[:20] + ["<user>hi<assistant>"]:
        assert chat.encode(text) == base.encode(text)
    assert chat.with_chat_tokens() is chat


# ---------------------------------------------------------------------------------------
# Standard sentencepiece models: sentencepiece itself where it provably agrees with the conversion.

ADVERSARIAL_TEXTS = [
    "", " ", "   ", "\n", "\t\t", "\n\n\n", " \n ", "x", " x", "x ", "  x  y   z  ", "a\tb\nc\r\nd\re",
    "1234567890 3.14159 2025-12-04 1,000,000 00000000", "aaaaaaaaaaaaaaaaaaaaaaa", "-" * 40, "=" * 33 + "\n" + "#" * 9,
    "naïve café résumé", "cafe\u0301 (combining acute)", "\ufb01le \ufb02ow (ligatures)", "\u00bd \u2153 \u00b2 \u2122",
    "\u2026 ellipsis \u00a0nbsp\u00a0 \u3000ideographic\u3000space", "\uff21\uff22\uff23 fullwidth",
    "\u2581meta\u2581 ", "trailing meta\u2581", "中文字符日本語한국어", "😀👍🏽🇫🇷👨‍👩‍👧 emoji",
    "\U0001d54f\U0001f9ec \U000e0041 rare planes",
    "\x00\x01\x07 controls \x1b[0m", "zero\u200bwidth\u200djoiner\ufeff", "ÅÅ Å Å", "\u0130stanbul \u1e9e",
    "def f(x):\n    return x ** 2  # comment\n", "<s> </s> <unk> <0x41> tags as text",
]


@pytest.fixture(scope="module")
def standard_bpe(texts, tmp_path_factory) -> str:
    """A standard sentencepiece BPE model: sentencepiece's defaults (nmt_nfkc, dummy prefix, whitespace
    escaping and collapsing) plus byte fallback, as LLaMA-style models have them."""
    import sentencepiece as spm

    prefix = str(tmp_path_factory.mktemp("std") / "standard")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 3), model_prefix=prefix, vocab_size=800,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    return prefix + ".model"


def _conversion_ids(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.backend.encode_batch(list(texts), add_special_tokens=False)]


def test_standard_bpe_model_is_encoded_by_sentencepiece_where_it_provably_agrees(standard_bpe, texts):
    from megatron_lime.tokenizer import ConvertedSentencePieceTokenizer

    tok = build_tokenizer(TokenizerSpec(tokenizer_model=standard_bpe))
    assert isinstance(tok, ConvertedSentencePieceTokenizer)
    assert tok.agreement.usable, tok.agreement.reason
    assert "sentencepiece encodes the texts on which it provably gives the ids" in tok.describe_encoder()
    rng = random.Random(7)  # text a covered document looks like: no NFKC-changed characters, CR or U+2581
    plain = ["".join(rng.choice("abcdefghij XYZ.,;:!?()[]{}<>/-_=+*#0123456789  \t\n中文字符日本語😀👍éçñøßΩж")
                     for _ in range(rng.randint(0, 60))) for _ in range(300)]
    adversarial = ADVERSARIAL_TEXTS + random_unicode_strings(300, seed=5) + plain
    covered = [t for t in adversarial if tok.agreement.covers(t)]
    # Not vacuous: plain text, whitespace runs, digits, controls, CJK and emoji are covered; NFKC-changed
    # characters, combining marks, CR and the meta symbol are not.
    assert {"", "  x  y   z  ", "\t\t", "中文字符日本語한국어", "aaaaaaaaaaaaaaaaaaaaaaa"} <= set(covered)
    assert not {"\ufb01le \ufb02ow (ligatures)", "cafe\u0301 (combining acute)", "a\tb\nc\r\nd\re",
                "trailing meta\u2581", "\uff21\uff22\uff23 fullwidth"} & set(covered)
    assert sum(map(tok.agreement.covers, plain)) == len(plain) and len(covered) > len(plain)
    # The claim: on every covered text sentencepiece gives the conversion's ids (byte fallback included)...
    by_sentencepiece = tok.processor.encode(covered)
    conversion = _conversion_ids(tok, covered)
    diverging = [(t, a, b) for t, a, b in zip(covered, by_sentencepiece, conversion) if a != b]
    assert not diverging, f"{len(diverging)} covered texts differ, e.g. {diverging[:1]}"
    assert any(tok.id_to_piece(i).startswith("<0x") for ids in by_sentencepiece for i in ids), \
        "no covered text exercised byte fallback"
    # ... and the tokenizer, whichever encoder each text goes to, gives the conversion's ids for every text.
    everything = adversarial + texts
    assert tok.encode_batch(everything) == _conversion_ids(tok, everything)
    assert [tok.encode(t) for t in adversarial] == _conversion_ids(tok, adversarial)
    # The compiled router against its Python reference: the same texts covered, the same words handed back and
    # the same of them doubtful.
    router = tok.agreement.router()
    ids, status, new_words, flags = router.encode(adversarial)
    assert [s != 1 for s in status] == [tok.agreement.covers(t) for t in adversarial]
    # Nothing known yet: only texts without words (empty, whitespace) are encoded, to no ids.
    assert ids == [[] if tok.agreement.covers(t) and not tok.agreement.words(t) else None for t in adversarial]
    words = set().union(*(tok.agreement.words(t) for t in covered + [t for t in texts if tok.agreement.covers(t)]))
    assert set(new_words) == set().union(*(tok.agreement.words(t) for t in covered)) and len(set(new_words)) == \
        len(new_words)
    assert flags == [tok.agreement.doubtful(w) for w in new_words]
    doubtful = {w for w in words if tok.agreement.doubtful(w)}
    assert tok.agreement.prove and doubtful
    # Once learnt, a covered text's ids are its words' sentencepiece ids put together: sentencepiece's own.
    router.learn(new_words, tok.encode_by_sentencepiece(new_words), [True] * len(new_words))
    ids, status, again, _ = router.encode(covered)
    assert status == [0] * len(covered) and again == [] and ids == tok.processor.encode(covered)
    # The shortcut: a word without a repeated multi-split piece is encoded alike (here checked, not assumed).
    plain_words = sorted(words - doubtful)
    assert len(plain_words) > 1000
    assert tok.encode_by_sentencepiece(plain_words) == tok.encode_by_conversion(plain_words)
    # A doubtful word is handed back to be checked; once known to differ, it sends its texts to the conversion.
    differs = sorted(doubtful)[0]
    fresh = tok.agreement.router()
    ids, status, handed, flags = fresh.encode([differs, f"  {differs}  y ", "y z"])
    assert status == [2, 2, 2] and handed == [differs, "y", "z"] and flags == [True, False, False]
    fresh.learn(handed, tok.encode_by_sentencepiece(handed), [False, True, True])
    ids, status, handed, _ = fresh.encode([differs, f"  {differs}  y ", "y z"])
    assert status == [1, 1, 0] and handed == [] and ids == [None, None, tok.processor.encode("y z")]
    # The SFT tags added as new ids keep the fast path (sentencepiece never produces them either).
    chat = tok.with_chat_tokens()
    assert isinstance(chat, ConvertedSentencePieceTokenizer) and chat.user_id == tok.vocab_size
    assert chat.encode_batch(everything) == _conversion_ids(tok, everything)
    clone = pickle.loads(pickle.dumps(chat))  # e.g. to spawned workers: the router is rebuilt
    assert clone.router is not None and clone.encode_batch(everything) == _conversion_ids(tok, everything)


def test_converted_form_is_cached_and_a_damaged_entry_is_computed_again(standard_bpe, texts, tmp_path, monkeypatch,
                                                                         capsys):
    from megatron_lime.tokenizer import conversion_cache

    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(tmp_path / "cache"))
    fresh = load_tokenizer(standard_bpe)
    (entry,) = (tmp_path / "cache" / "sentencepiece").iterdir()
    written = entry.read_bytes()
    # From the cache: nothing is converted or derived again, and the tokenizer is the same.
    originals = conversion_cache.converted_sentencepiece_backend, conversion_cache.sentencepiece_agreement

    def not_again(*args, **kwargs):
        raise AssertionError("the converted form was computed again")

    monkeypatch.setattr(conversion_cache, "converted_sentencepiece_backend", not_again)
    monkeypatch.setattr(conversion_cache, "sentencepiece_agreement", not_again)
    cached = load_tokenizer(standard_bpe)
    assert cached.agreement.to_json() == fresh.agreement.to_json() and cached.agreement.usable
    assert cached.backend.to_str() == fresh.backend.to_str()
    everything = ADVERSARIAL_TEXTS + texts
    assert cached.encode_batch(everything) == fresh.encode_batch(everything) == _conversion_ids(fresh, everything)
    # A damaged entry is never used: one warning, computed again and rewritten.
    damaged = bytearray(written)
    damaged[len(damaged) // 2] ^= 0x01
    entry.write_bytes(bytes(damaged))
    with pytest.raises(AssertionError, match="computed again"):
        load_tokenizer(standard_bpe)
    assert "damaged tokenizer cache entry" in capsys.readouterr().err
    monkeypatch.setattr(conversion_cache, "converted_sentencepiece_backend", originals[0])
    monkeypatch.setattr(conversion_cache, "sentencepiece_agreement", originals[1])
    assert load_tokenizer(standard_bpe).encode_batch(everything) == fresh.encode_batch(everything)
    assert entry.read_bytes() == written
    # Another model (here: other whitespace settings) is another entry.
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(open(standard_bpe, "rb").read())
    proto.normalizer_spec.add_dummy_prefix = False
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    assert "whitespace settings" in load_tokenizer(str(other)).agreement.reason
    assert len(list((tmp_path / "cache" / "sentencepiece").iterdir())) == 2
    # Off: nothing written. A folder that cannot be made: one warning, and the tokenizer still loads.
    monkeypatch.setenv("MEGATRON_LIME_CACHE", "off")
    assert conversion_cache.cache_folder() is None
    assert load_tokenizer(standard_bpe).encode_batch(everything) == fresh.encode_batch(everything)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEGATRON_LIME_CACHE", str(blocker / "cache"))
    assert load_tokenizer(standard_bpe).encode_batch(everything) == fresh.encode_batch(everything)
    assert "tokenizer cache not written" in capsys.readouterr().err


def test_word_router_keeps_at_most_its_limit_of_agreeing_words_and_every_differing_one(standard_bpe, texts):
    tok = load_tokenizer(standard_bpe)
    words = sorted(set().union(*(tok.agreement.words(t) for t in texts if tok.agreement.covers(t))))
    doubtful = [w for w in words if tok.agreement.doubtful(w)]
    plain = [w for w in words if not tok.agreement.doubtful(w)]
    assert doubtful and len(plain) > 200
    router = tok.agreement.router(limit=100)
    router.learn(doubtful[:1], tok.encode_by_sentencepiece(doubtful[:1]), [False])
    text = " ".join(plain)
    ids, status, handed, flags = router.encode([text])
    assert status == [2] and handed == plain and not any(flags)
    # Every word of one learn() is kept, even past the limit: the text is encoded right after.
    router.learn(handed, tok.encode_by_sentencepiece(handed), [True] * len(handed))
    assert router.agreeing == len(plain) > 100 and router.differing == 1
    ids, status, _, _ = router.encode([text])
    assert status == [0] and ids == [tok.processor.encode(text)]
    # The next words go past the limit: the agreeing ones are forgotten first, the differing one is kept.
    novel = "qqzzxv"
    assert novel not in plain
    router.learn([novel], tok.encode_by_sentencepiece([novel]), [True])
    assert router.agreeing == 1 and router.differing == 1
    assert router.encode([f"a {doubtful[0]}"])[1] == [1]
    # Forgotten words are simply new again.
    ids, status, handed, _ = router.encode([text, novel])
    assert status == [2, 0] and handed == plain and ids[1] == tok.processor.encode(novel)


def test_agreement_is_refused_where_it_cannot_be_shown(standard_bpe, texts, tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from megatron_lime.tokenizer import sentencepiece_agreement
    from megatron_lime.tokenizer.agreement import charsmap_rules

    proto = sp_pb2.ModelProto()
    with open(standard_bpe, "rb") as f:
        proto.ParseFromString(f.read())
    rules = charsmap_rules(proto.normalizer_spec.precompiled_charsmap)
    # The charsmap read back: nmt_nfkc's NFKC rules (fullwidth, ellipsis, ligature) and a multi-character key.
    assert rules["\uff21"] == "A" and rules["\u2026"] == "..." and rules["\ufb01"] == "fi"
    assert any(len(key) > 1 for key in rules)

    def reason(edit) -> str | None:
        changed = sp_pb2.ModelProto()
        changed.CopyFrom(proto)
        edit(changed)
        return sentencepiece_agreement(changed).reason

    def meta_inside(p):
        piece = next(q for q in p.pieces if q.type == sp_pb2.ModelProto.SentencePiece.NORMAL and len(q.piece) > 2)
        piece.piece = piece.piece[0] + "\u2581" + piece.piece[1:]

    assert reason(lambda p: None) is None
    assert "whitespace settings" in reason(lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", False))
    assert "whitespace settings" in reason(lambda p: setattr(p.normalizer_spec, "remove_extra_whitespaces", False))
    assert "after its start (merges across words)" in reason(meta_inside)
    assert "user-defined" in reason(lambda p: setattr(p.pieces[-1], "type",
                                                       sp_pb2.ModelProto.SentencePiece.USER_DEFINED))
    prefix = str(tmp_path / "unigram")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=400,
                                   model_type="unigram", byte_fallback=True, minloglevel=2)
    unigram = load_tokenizer(prefix + ".model")
    assert "UNIGRAM model, not BPE" in unigram.agreement.reason
    assert not unigram.agreement.covers("plain text") and unigram.by_sentencepiece(["plain text"]) == [False]
    assert unigram.encode_batch(ADVERSARIAL_TEXTS) == _conversion_ids(unigram, ADVERSARIAL_TEXTS)


def test_every_file_of_a_tokenizer_directory_is_written_through_files_py(texts, tmp_path, monkeypatch):
    """train_tokenizer and the export write each file with a temporary name, fsync and rename (files.py)."""
    from megatron_lime import files
    from megatron_lime.tokenizer import train_tokenizer

    written = []
    atomic_write = files.atomic_write

    def recording(path, *args, **kwargs):
        written.append(os.path.basename(path))
        return atomic_write(path, *args, **kwargs)

    monkeypatch.setattr(files, "atomic_write", recording)
    out = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=400)
    expected = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer_info.json"]
    assert sorted(written) == sorted(os.listdir(out)) == sorted(expected)
    with open(os.path.join(out, "tokenizer_info.json"), encoding="utf-8") as f:
        assert json.load(f)["lossless"] is True
