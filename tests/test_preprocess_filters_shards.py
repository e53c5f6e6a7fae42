"""Preprocessing with --filter (JSONL and parquet) and with --num-shards/--shard-index + merge (byte-identical)."""

import json
import os

import pytest
from helpers import tiny_corpus_with_tokenizer
from megatron_lime.data import merge

from megatron_lime.data import preprocess as preprocessing
from megatron_lime.data.indexed_dataset import IndexedDataset
from megatron_lime.tokenizer import load_tokenizer

LANGUAGES = ("en", "en", "de", "en", "fr")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 FineWeb-Edu-schema records whose int_score (0-4) and language vary, as JSONL and as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("filters")
    corpus, tokenizer_dir, records = tiny_corpus_with_tokenizer(str(root))
    for i, record in enumerate(records):
        record["int_score"] = i % 5
        record["language"] = LANGUAGES[i % 7 % 5]
        record["language_score"] = round(0.5 + (i % 10) / 20, 2)
    jsonl = root / "varied.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    parquet = root / "varied.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=25)
    return tokenizer_dir, records, str(jsonl), str(parquet)


def preprocess(*args: str) -> int:
    return preprocessing.main(["--quiet", *args])


def read_all(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected_ids(tokenizer_dir: str, texts: list[str]) -> list[list[int]]:
    tok = load_tokenizer(tokenizer_dir)
    return [tok.encode(t) + [tok.eos_id] for t in texts if t]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_filters_keep_what_holds_and_count(data, tmp_path, capsys, kind):
    tokenizer_dir, records, jsonl, parquet = data
    prefix = str(tmp_path / "f")
    assert preprocess("--input", jsonl if kind == "jsonl" else parquet, "--output-prefix", prefix,
                      "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", "2",
                      "--filter", "int_score >= 3", "--filter", "language == 'en' and language_score >= 0.6") == 0
    kept = [r for r in records if r["int_score"] >= 3 and r["language"] == "en" and r["language_score"] >= 0.6]
    assert 0 < len(kept) < len(records)
    assert read_all(prefix + "_text_document") == expected_ids(tokenizer_dir, [r["text"] for r in kept])
    first = [r for r in records if r["int_score"] >= 3]
    out = capsys.readouterr().out
    assert f"filter 'int_score >= 3': kept {len(first)}, dropped {len(records) - len(first)}" in out
    assert (f"filter \"language == 'en' and language_score >= 0.6\": kept {len(kept)}, "
            f"dropped {len(first) - len(kept)}") in out
    assert f"{len(records) - len(kept)} filtered out" in out and f"done: {len(kept)} documents" in out


def test_filter_in_list_and_not(data, tmp_path):
    tokenizer_dir, records, jsonl, _ = data
    prefix = str(tmp_path / "g")
    assert preprocess("--input", jsonl, "--output-prefix", prefix, "--tokenizer-model", tokenizer_dir, "--append-eod",
                      "--filter", "language in ['de', 'fr'] and not int_score == 0") == 0
    kept = [r["text"] for r in records if r["language"] in ("de", "fr") and r["int_score"] != 0]
    assert read_all(prefix + "_text_document") == expected_ids(tokenizer_dir, kept)


def test_parquet_large_row_groups_streamed_by_the_main_process(data, tmp_path, monkeypatch):
    tokenizer_dir, records, jsonl, parquet = data
    # Row groups of 25 rows over a limit of 10: the main process reads them in batches instead.
    monkeypatch.setattr(preprocessing, "MAX_WORKER_ROW_GROUP_ROWS", 10)
    monkeypatch.setattr(preprocessing, "CHUNK_ROWS", 7)
    assert preprocess("--input", parquet, "--output-prefix", str(tmp_path / "big"), "--tokenizer-model", tokenizer_dir,
                      "--append-eod", "--filter", "int_score >= 2") == 0
    kept = [r["text"] for r in records if r["int_score"] >= 2]
    assert read_all(str(tmp_path / "big_text_document")) == expected_ids(tokenizer_dir, kept)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('touch /tmp/x')", "column 1: function calls are not allowed"),
    ("text.upper() == 'A'", "column 1: function calls are not allowed"),
    ("int_score >=", "at the end: not a valid expression"),
])
def test_bad_expression_is_one_line_and_writes_nothing(data, tmp_path, capsys, expression, message):
    tokenizer_dir, _, jsonl, _ = data
    out = tmp_path / "out"
    assert preprocess("--input", jsonl, "--output-prefix", str(out / "x"), "--tokenizer-model", tokenizer_dir,
                      "--filter", expression) == 1
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and err.startswith(f"error: --filter {expression!r}: {message}")
    assert not out.exists() or os.listdir(out) == []


def test_missing_filter_column(data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer_dir, _, _, _ = data
    path = tmp_path / "sparse.jsonl"
    path.write_text('{"text": "a", "int_score": 3}\n{"text": "b"}\n{"text": "c", "int_score": 1}\n')
    assert preprocess("--input", str(path), "--output-prefix", str(tmp_path / "m"), "--tokenizer-model", tokenizer_dir,
                      "--filter", "int_score >= 3") == 1
    assert (f"{path}: line 2: --filter 'int_score >= 3': no column 'int_score' in this record (columns: text)"
            in capsys.readouterr().err)
    assert not os.path.exists(str(tmp_path / "m_text_document.bin"))
    # With --skip-bad-records the record is counted as bad and the rest filtered as usual.
    assert preprocess("--input", str(path), "--output-prefix", str(tmp_path / "m"), "--tokenizer-model", tokenizer_dir,
                      "--filter", "int_score >= 3", "--skip-bad-records") == 0
    out = capsys.readouterr().out
    assert "done: 1 documents" in out and "1 bad records skipped" in out and "1 filtered out" in out
    # Parquet: the column is checked once per file.
    pq.write_table(pa.table({"text": ["a"], "score": [3.5]}), tmp_path / "noscore.parquet")
    assert preprocess("--input", str(tmp_path / "noscore.parquet"), "--output-prefix", str(tmp_path / "p"),
                      "--tokenizer-model", tokenizer_dir, "--filter", "int_score >= 3") == 1
    assert (f"{tmp_path / 'noscore.parquet'}: file: --filter 'int_score >= 3': no column 'int_score' "
            "(columns: text, score)" in capsys.readouterr().err)


def test_type_mismatch_names_the_record(data, tmp_path, capsys):
    tokenizer_dir, _, jsonl, _ = data
    assert preprocess("--input", jsonl, "--output-prefix", str(tmp_path / "t"), "--tokenizer-model", tokenizer_dir,
                      "--filter", "int_score >= '3'") == 1
    assert f"{jsonl}: line 1: --filter \"int_score >= '3'\": cannot compare int 0 >= str '3'" in capsys.readouterr().err


def test_shards_merge_byte_identical_to_one_run(data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer_dir, records, _, _ = data
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # 7 files of different sizes, JSONL and parquet mixed, listed in sorted name order by --input DIR.
    cuts = [0, 5, 30, 34, 60, 61, 95, 120]
    for k in range(7):
        part = records[cuts[k]:cuts[k + 1]]
        if k % 2:
            pq.write_table(pa.Table.from_pylist(part), inputs / f"part-{k}.parquet", row_group_size=8)
        else:
            (inputs / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    common = ["--input", str(inputs), "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", "2",
              "--filter", "int_score >= 1"]
    assert preprocess(*common, "--output-prefix", str(tmp_path / "single")) == 0
    shard_dir = tmp_path / "shards"
    for index in range(3):
        assert preprocess(*common, "--output-prefix", str(shard_dir / "fw"), "--num-shards", "3",
                          "--shard-index", str(index)) == 0
    out = capsys.readouterr().out
    assert "shard 1 of 3:" in out
    names = sorted(os.listdir(shard_dir))
    assert names[0] == "fw_shard00000-of-00003_text_document.bin" and len(names) == 6
    assert all(len(IndexedDataset(str(shard_dir / n[:-4]))) > 0 for n in names if n.endswith(".idx"))
    assert merge.main(["--input", str(shard_dir), "--output-prefix", str(tmp_path / "merged_text_document")]) == 0
    for ext in (".bin", ".idx"):
        single = (tmp_path / f"single_text_document{ext}").read_bytes()
        assert (tmp_path / f"merged_text_document{ext}").read_bytes() == single
    assert len(IndexedDataset(str(tmp_path / "single_text_document"))) == sum(r["int_score"] >= 1 for r in records)


def test_shard_flags_checked(data, tmp_path):
    tokenizer_dir, _, jsonl, _ = data
    with pytest.raises(SystemExit):
        preprocessing.parse_args(["--input", jsonl, "--output-prefix", "x", "--tokenizer-model", tokenizer_dir,
                                  "--num-shards", "2", "--shard-index", "2"])


def test_more_shards_than_files_gives_empty_shards_that_merge(data, tmp_path):
    tokenizer_dir, records, _, _ = data
    inputs = tmp_path / "two"
    inputs.mkdir()
    for k in range(2):
        (inputs / f"p{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[k * 10:(k + 1) * 10]))
    common = ["--input", str(inputs), "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", "1"]
    assert preprocess(*common, "--output-prefix", str(tmp_path / "single")) == 0
    for index in range(3):
        assert preprocess(*common, "--output-prefix", str(tmp_path / "shards" / "s"), "--num-shards", "3",
                          "--shard-index", str(index)) == 0
    sizes = [len(IndexedDataset(str(tmp_path / "shards" / f"s_shard{k:05d}-of-00003_text_document"))) for k in range(3)]
    assert sorted(sizes) == [0, 10, 10]
    assert merge.main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "m")]) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"single_text_document{ext}").read_bytes()


def test_sbatch_array_tasks_then_merge(data, tmp_path):
    """The shipped job array script, run as SLURM would run tasks 0 and 1 (no SLURM needed)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer_dir, records, _, _ = data
    raw = tmp_path / "raw"
    raw.mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(records[k * 40:(k + 1) * 40]), raw / f"{k:03d}_00000.parquet")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "REPO": repo, "INPUT": str(raw / "*.parquet"), "TOKENIZER_MODEL": tokenizer_dir,
           "NUM_SHARDS": "2", "SHARD_DIR": str(tmp_path / "shards"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    for index in range(2):
        subprocess.run(["bash", os.path.join(repo, "examples/slurm/preprocess_fineweb_edu.sbatch"),
                        "--workers", "1", "--quiet"],
                       env={**env, "SLURM_ARRAY_TASK_ID": str(index)}, cwd=tmp_path, check=True, capture_output=True)
    assert merge.main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "merged")]) == 0
    kept = [r["text"] for r in records if r["language"] == "en" and r["int_score"] >= 3]
    assert read_all(str(tmp_path / "merged")) == expected_ids(tokenizer_dir, kept)
