"""Pretraining preprocessing (megatron_lime.data.preprocess, tools/preprocess_data.py): every input kind, ids
equal the tokenizer's, bad input handling."""

import gzip
import json
import os

import numpy as np
import pytest
from helpers import tiny_corpus_with_tokenizer

from megatron_lime.data.indexed_dataset import IndexedDataset
from megatron_lime.data import preprocess as preprocessing
from megatron_lime.errors import LimeInputError
from megatron_lime.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return tiny_corpus_with_tokenizer(str(root))


def preprocess(*args: str) -> int:
    return preprocessing.main(["--quiet", *args])


def read_all(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected_ids(tokenizer_dir: str, texts: list[str], append_eod: bool = True) -> list[list[int]]:
    tok = load_tokenizer(tokenizer_dir)
    return [tok.encode(t) + ([tok.eos_id] if append_eod else []) for t in texts if t]


def outputs_in(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".bin" in n or ".idx" in n)


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trip(data, tmp_path, workers, capsys):
    corpus, tokenizer_dir, records = data
    prefix = str(tmp_path / "out")
    assert preprocess("--input", corpus, "--output-prefix", prefix, "--tokenizer-model", tokenizer_dir,
                      "--append-eod", "--workers", str(workers)) == 0
    docs = read_all(prefix + "_text_document")
    assert docs == expected_ids(tokenizer_dir, [r["text"] for r in records])
    ds = IndexedDataset(prefix + "_text_document", vocab_size=512)
    assert ds.dtype is np.uint16
    assert ds.document_indices.tolist() == list(range(len(records) + 1))
    summary = capsys.readouterr().out
    assert f"{len(records)} documents" in summary and "0 empty documents skipped" in summary
    # Decoding the stored ids gives back the text exactly.
    tok = load_tokenizer(tokenizer_dir)
    assert tok.decode(docs[3][:-1]) == records[3]["text"]


def test_gz_parquet_directory_and_several_keys(data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, tokenizer_dir, records = data
    shards = tmp_path / "shards"
    shards.mkdir()
    first, second = records[:50], records[50:]
    with gzip.open(shards / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in first:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(second), shards / "b.parquet", row_group_size=17)
    prefix = str(tmp_path / "multi")
    assert preprocess("--input", str(shards), "--output-prefix", prefix, "--tokenizer-model", tokenizer_dir,
                      "--json-keys", "text", "url", "--workers", "2") == 0
    assert read_all(prefix + "_text_document") == expected_ids(tokenizer_dir, [r["text"] for r in records], False)
    assert read_all(prefix + "_url_document") == expected_ids(tokenizer_dir, [r["url"] for r in records], False)
    # A glob picks the same files.
    assert preprocess("--input", str(shards / "*"), "--output-prefix", str(tmp_path / "glob"),
                      "--tokenizer-model", tokenizer_dir) == 0
    assert read_all(str(tmp_path / "glob_text_document")) == read_all(prefix + "_text_document")


def test_saved_datasets_dataset(data, tmp_path):
    import datasets

    corpus, tokenizer_dir, records = data
    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(records[:30]).save_to_disk(path)
    assert preprocess("--input", path, "--output-prefix", str(tmp_path / "ds"), "--tokenizer-model", tokenizer_dir,
                      "--append-eod", "--tokenizer-type", "SentencePieceTokenizer") == 0
    assert (read_all(str(tmp_path / "ds_text_document"))
            == expected_ids(tokenizer_dir, [r["text"] for r in records[:30]]))


def test_hugging_face_tokenizer_directory(data, tmp_path):
    corpus, tokenizer_dir, records = data
    hf_dir = str(tmp_path / "hf")
    load_tokenizer(tokenizer_dir).save_hf(hf_dir)
    assert preprocess("--input", corpus, "--output-prefix", str(tmp_path / "hf_out"), "--tokenizer-model", hf_dir,
                      "--append-eod", "--tokenizer-type", "HuggingFaceTokenizer", "--workers", "2") == 0
    assert read_all(str(tmp_path / "hf_out_text_document")) == expected_ids(tokenizer_dir, [r["text"] for r in records])


def test_empty_documents_skipped_and_counted(data, tmp_path, capsys):
    _, tokenizer_dir, _ = data
    path = tmp_path / "with_empty.jsonl"
    path.write_text('{"text": "one"}\n{"text": ""}\n\n{"text": "two"}\n')
    assert preprocess("--input", str(path), "--output-prefix", str(tmp_path / "e"),
                      "--tokenizer-model", tokenizer_dir) == 0
    assert len(read_all(str(tmp_path / "e_text_document"))) == 2
    assert "1 empty documents skipped" in capsys.readouterr().out


BAD_LINES = [
    ('{"text": "ok"}\n{"text": "broken\n', "line 2: malformed JSON"),
    ('{"text": "ok"}\n{"txt": "no key"}\n', "line 2: missing key 'text'"),
    ('{"text": "ok"}\n{"text": ["a list"]}\n', "line 2: key 'text' is list, expected a string"),
    ('{"text": "ok"}\n{"text": null}\n', "line 2: key 'text' is NoneType"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
]


@pytest.mark.parametrize("content, message",
                         BAD_LINES + [(b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: invalid UTF-8")])
def test_bad_jsonl_fails_cleanly(data, tmp_path, capsys, content, message):
    _, tokenizer_dir, _ = data
    path = tmp_path / "bad.jsonl"
    # Many good lines first, so the bad one is in a later chunk than the first.
    good = '{"text": "fine text"}\n' * 3000
    path.write_bytes(good.encode() + (content if isinstance(content, bytes) else content.encode()))
    out_dir = tmp_path / "out"
    rc = preprocess("--input", str(path), "--output-prefix", str(out_dir / "bad"), "--tokenizer-model", tokenizer_dir,
                    "--workers", "2")
    assert rc == 1
    line = int(message.split()[1].rstrip(":")) + 3000
    assert f"{path}: line {line}: {message.split(': ', 1)[1]}" in capsys.readouterr().err
    assert not out_dir.exists() or outputs_in(out_dir) == []


def test_skip_bad_records(data, tmp_path, capsys):
    _, tokenizer_dir, _ = data
    path = tmp_path / "mixed.jsonl"
    lines = [b'{"text": "good one"}', b'{"text": "bro', b'{"other": 1}', b'{"text": 3}', b'{"text": "\xff"}',
             b'{"text": "good two"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert preprocess("--input", str(path), "--output-prefix", str(tmp_path / "s"), "--tokenizer-model", tokenizer_dir,
                      "--skip-bad-records") == 0
    assert read_all(str(tmp_path / "s_text_document")) == expected_ids(tokenizer_dir, ["good one", "good two"], False)
    captured = capsys.readouterr()
    assert "4 bad records skipped" in captured.out
    assert f"{path}: line 5: invalid UTF-8" in captured.err


def test_unreadable_parquet(data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tokenizer_dir, records = data
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(records[:10]), shards / "a.parquet")
    (shards / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    out = tmp_path / "out"
    assert preprocess("--input", str(shards), "--output-prefix", str(out / "p"),
                      "--tokenizer-model", tokenizer_dir) == 1
    assert f"{shards / 'b.parquet'}: file: unreadable parquet file" in capsys.readouterr().err
    assert not out.exists() or outputs_in(out) == []
    # Skipping: the good file's documents are kept and the bad file counted.
    assert preprocess("--input", str(shards), "--output-prefix", str(out / "p"), "--tokenizer-model", tokenizer_dir,
                      "--skip-bad-records") == 0
    assert len(read_all(str(out / "p_text_document"))) == 10
    assert "1 bad records skipped" in capsys.readouterr().out


def test_parquet_null_and_missing_column(data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tokenizer_dir, _ = data
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    assert preprocess("--input", str(tmp_path / "nulls.parquet"), "--output-prefix", str(tmp_path / "n"),
                      "--tokenizer-model", tokenizer_dir) == 1
    assert f"{tmp_path / 'nulls.parquet'}: row 1: column 'text' is null" in capsys.readouterr().err
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nokey.parquet")
    assert preprocess("--input", str(tmp_path / "nokey.parquet"), "--output-prefix", str(tmp_path / "k"),
                      "--tokenizer-model", tokenizer_dir) == 1
    assert "missing column 'text' (columns: body)" in capsys.readouterr().err
    assert outputs_in(tmp_path) == []


def test_missing_input(data, tmp_path, capsys):
    _, tokenizer_dir, _ = data
    assert preprocess("--input", str(tmp_path / "nothing*.jsonl"), "--output-prefix", str(tmp_path / "x"),
                      "--tokenizer-model", tokenizer_dir) == 1
    assert "no such file" in capsys.readouterr().err


def test_chunks_shrink_over_the_last_part_of_the_input_and_keep_every_line(data, tmp_path, monkeypatch):
    corpus, tokenizer_dir, records = data
    monkeypatch.setattr(preprocessing, "CHUNK_BYTES", 32 << 10)  # the corpus: 250 KB, lines of 2 KB on average
    monkeypatch.setattr(preprocessing, "MIN_CHUNK_BYTES", 1 << 10)
    second = tmp_path / "second.jsonl"
    second.write_bytes(open(corpus, "rb").read())
    sources = [preprocessing.InputSource(corpus, "jsonl"), preprocessing.InputSource(str(second), "jsonl")]
    chunks = list(preprocessing.iter_chunks(sources, ("text",), preprocessing.RecordFilters(()), False, workers=2))
    sizes = [end - start for start, end in (c.jsonl_range for c in chunks)]
    assert (b"".join(preprocessing.read_jsonl_range(c.path, *c.jsonl_range) for c in chunks)
            == open(corpus, "rb").read() * 2)
    assert min(sizes[:5]) > 25 << 10 and sum(sizes[-5:]) / 5 < 8 << 10  # full-size at first, small at the very end
    text = open(corpus, "rb").read()
    assert all(c.first_record == 1 + text.count(b"\n", 0, c.jsonl_range[0]) for c in chunks)  # error messages' lines
    # Same output as with the default chunking.
    assert preprocess("--input", f"{corpus},{second}", "--output-prefix", str(tmp_path / "small"), "--tokenizer-model",
                      tokenizer_dir, "--append-eod", "--workers", "2") == 0
    assert (read_all(str(tmp_path / "small_text_document"))
            == expected_ids(tokenizer_dir, [r["text"] for r in records]) * 2)


def test_a_tokenizer_failing_the_export_check_writes_nothing_though_workers_started(data, tmp_path, monkeypatch,
                                                                                    capsys):
    # The check runs once the workers have their first chunks; its failure must still leave no output.
    from megatron_lime.tokenizer import LimeTokenizer

    corpus, tokenizer_dir, _ = data
    monkeypatch.setattr(preprocessing, "CHUNK_BYTES", 2048)

    def refuse(self):  # what the real check raises (LimeInputError: the tokenizer is bad input)
        raise LimeInputError(f"tokenizer {self.path}: encodes differently (test)")

    monkeypatch.setattr(LimeTokenizer, "check_exportable", refuse)
    out = tmp_path / "out"
    out.mkdir()
    assert preprocess("--input", corpus, "--output-prefix", str(out / "ds"), "--tokenizer-model", tokenizer_dir,
                      "--workers", "2") == 1
    assert "encodes differently (test)" in capsys.readouterr().err
    assert os.listdir(out) == []


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("eod", [None, 0, 7])
def test_pack_documents_equals_its_numpy_reference(dtype, eod):
    rng = np.random.default_rng(0)
    top = 65_535 if dtype is np.uint16 else 2**31 - 1
    encoded = [rng.integers(0, top, size=int(n), endpoint=True).tolist() for n in rng.integers(0, 40, size=300)]
    encoded += [[], [top], [0], []]  # empty documents (dropped), the extreme ids
    got = preprocessing.pack_documents([list(ids) for ids in encoded], eod, dtype)
    want = preprocessing.pack_documents_reference([list(ids) for ids in encoded], eod, dtype)
    assert got[0].dtype == want[0].dtype == dtype and got[1].dtype == want[1].dtype == np.int32
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert preprocessing.pack_documents([(1, 2), []], eod, dtype)[0].tolist() == [1, 2] + ([] if eod is None else [eod])
    assert [a.size for a in preprocessing.pack_documents([], eod, dtype)[:2]] == [0, 0]


def test_pack_documents_refuses_ids_that_do_not_fit():
    with pytest.raises(ValueError, match="token id 65536 \\(document 1\\) does not fit"):
        preprocessing.pack_documents([[1], [65536]], None, np.uint16)
    with pytest.raises(ValueError, match="token id -1"):
        preprocessing.pack_documents([[-1]], None, np.int32)
    with pytest.raises(TypeError):
        preprocessing.pack_documents([["a"]], None, np.int32)
