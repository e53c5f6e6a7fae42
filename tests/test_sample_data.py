"""The embedded sample corpus: deterministic, in FineWeb-Edu's and dolly's schemas."""

import json

from megatron_lime.sample_data import write_instruction_set, write_pretraining_corpus

FINEWEB_EDU_COLUMNS = {"text", "id", "dump", "url", "file_path", "language", "language_score", "token_count",
                       "score", "int_score"}


def test_pretraining_corpus_is_deterministic_fineweb_edu_jsonl(tmp_path):
    first = write_pretraining_corpus(str(tmp_path / "a.jsonl"), max_bytes=200_000)
    second = write_pretraining_corpus(str(tmp_path / "b.jsonl"), max_bytes=200_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first["documents"] == second["documents"] > 10
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(set(r) == FINEWEB_EDU_COLUMNS for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["language"] == "en" and r["dump"] == "CC-MAIN-2025-05" and r["text"].strip() for r in rows)
    assert 200_000 <= sum(len(r["text"].encode()) for r in rows) < 200_000 + max(len(r["text"].encode()) for r in rows)


def test_instruction_set_uses_dollys_schema(tmp_path):
    summary = write_instruction_set(str(tmp_path / "sft.jsonl"), max_examples=30)
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert summary["examples"] == len(rows) == 30
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in rows)
    assert {r["category"] for r in rows} == {"open_qa", "closed_qa", "information_extraction"}
    assert all(r["response"].strip() and r["instruction"].strip() for r in rows)
    assert any(r["context"] for r in rows) and any(not r["context"] for r in rows)
