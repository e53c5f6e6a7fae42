"""Data-side failures (issue 12): each names the file and the reason in one line, exits 1, writes nothing
that looks complete. Damaged .gz input, empty input, an unwritable or full output disk, token ids
outside the model's vocabulary; for pretraining and SFT preprocessing."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import train_tiny_tokenizer, write_tiny_corpus

from megatron_lime.data import preprocess as preprocessing
from megatron_lime.data.builder import build_datasets
from megatron_lime.data.indexed_dataset import (DatasetWriteError, IndexedDataset, IndexedDatasetError,
                                                IndexedDatasetWriter)
from megatron_lime.data.sft import preprocess as sft_preprocessing
from megatron_lime.sample_data import write_instruction_set
from megatron_lime.training.config import parse_training_args
from megatron_lime.training.data import dataset_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_LINES = "".join(json.dumps({"text": f"document number {i} about files"}) + "\n" for i in range(4000))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail")
    return train_tiny_tokenizer(str(root / "tokenizer"), write_tiny_corpus(str(root / "corpus.jsonl"), num_docs=120))


def damaged_gzips(directory) -> dict[str, tuple[str, str]]:
    """name -> (path, expected reason) of three damaged .jsonl.gz files."""
    data = gzip.compress(GOOD_LINES.encode(), mtime=0)
    files = {
        "truncated": (data[: len(data) // 2], "truncated gzip file"),
        "bad_crc": (data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:],
                    "corrupt gzip file (CRC check failed"),
        "not_gzip": (b"this was never gzip data\n", "corrupt gzip file (Not a gzipped file"),
    }
    out = {}
    for name, (content, reason) in files.items():
        path = os.path.join(str(directory), f"{name}.jsonl.gz")
        with open(path, "wb") as f:
            f.write(content)
        out[name] = (path, reason)
    return out


def outputs(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def run_cli(tool: str, args: list[str], limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """Run tools/<tool>.py in a fresh interpreter; optionally with a file-size limit that acts as a full disk."""
    prologue = ""
    if limit_file_size is not None:
        # Writing past RLIMIT_FSIZE fails with EFBIG ("File too large") once SIGXFSZ is ignored, the way
        # a full disk fails with ENOSPC: an OSError part-way through writing the output.
        prologue = (f"import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_file_size}, {limit_file_size})); ")
    code = f"{prologue}import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, os.path.join(REPO, "tools", f"{tool}.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------
# Pretraining preprocessing.


@pytest.mark.parametrize("kind", ["truncated", "bad_crc", "not_gzip"])
def test_damaged_gzip_names_the_file_and_is_skippable(tokenizer_dir, tmp_path, capsys, kind):
    path, reason = damaged_gzips(tmp_path)[kind]
    out = tmp_path / "out"
    assert preprocessing.main(["--quiet", "--input", path, "--output-prefix", str(out / "d"),
                               "--tokenizer-model", tokenizer_dir, "--workers", "2"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}: line " in line and reason in line
    assert outputs(out) == []
    # Skipped as a bad file next to a good one: the good documents are written, the file counted.
    shards = tmp_path / "shards"
    shards.mkdir()
    os.replace(path, shards / os.path.basename(path))
    good_lines = GOOD_LINES.splitlines(keepends=True)[:40]
    (shards / "good.jsonl").write_text("".join(good_lines))
    assert preprocessing.main(["--quiet", "--input", str(shards), "--output-prefix", str(out / "s"),
                               "--tokenizer-model", tokenizer_dir, "--skip-bad-records"]) == 0
    captured = capsys.readouterr()
    assert "1 bad records skipped" in captured.out
    assert f"{shards / os.path.basename(path)}: line " in captured.err and reason in captured.err
    # What was read before the damage is kept (none here: the damaged files are smaller than one read block).
    assert len(IndexedDataset(str(out / "s_text_document"))) == len(good_lines)


def test_damaged_gzip_from_the_command_line_is_one_line(tokenizer_dir, tmp_path):
    path, reason = damaged_gzips(tmp_path)["truncated"]
    result = run_cli("preprocess_data", ["--quiet", "--input", path, "--output-prefix", str(tmp_path / "out" / "d"),
                                         "--tokenizer-model", tokenizer_dir, "--workers", "1"])
    assert result.returncode == 1
    assert reason in one_error_line(result.stderr) and path in result.stderr


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"])
def test_empty_input_is_an_error_unless_allowed(tokenizer_dir, tmp_path, capsys, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    args = ["--quiet", "--input", str(path), "--tokenizer-model", tokenizer_dir, "--workers", "1"]
    assert preprocessing.main([*args, "--output-prefix", str(out / "e")]) == 1
    line = one_error_line(capsys.readouterr().err)
    blank = content.count("\n")
    assert "no documents" in line and f"{blank} blank lines" in line and "--allow-empty" in line
    assert outputs(out) == []
    assert preprocessing.main([*args, "--output-prefix", str(out / "e"), "--allow-empty"]) == 0
    assert len(IndexedDataset(str(out / "e_text_document"))) == 0
    assert f"0 documents, 0 tokens, 0 empty documents skipped, {blank} blank lines skipped" in capsys.readouterr().out


def test_blank_lines_are_counted_in_the_summary(tokenizer_dir, tmp_path, capsys):
    path = tmp_path / "blanks.jsonl"
    path.write_text('{"text": "one"}\n\n  \n{"text": "two"}\n\n{"text": "three"}')  # no final newline
    assert preprocessing.main(["--quiet", "--input", str(path), "--output-prefix", str(tmp_path / "b"),
                               "--tokenizer-model", tokenizer_dir, "--workers", "1"]) == 0
    assert "3 documents" in (out := capsys.readouterr().out) and "3 blank lines skipped" in out


def test_full_disk_names_the_output_and_leaves_nothing(tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(GOOD_LINES)  # ~60k tokens: 120 kB of uint16, past the 32 kB limit
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("preprocess_data", ["--quiet", "--input", str(corpus), "--output-prefix", str(out / "full"),
                                         "--tokenizer-model", tokenizer_dir, "--workers", "1"], limit_file_size=32_000)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert f"{out / 'full'}_text_document.bin: cannot write: File too large" in line
    assert outputs(out) == []


def unwritable_directory(tmp_path) -> str:
    """A directory this process cannot create files in (root ignores permission bits: use sysfs)."""
    if os.geteuid() == 0:
        return "/sys/lime-cannot-write-here"
    directory = tmp_path / "read-only"
    directory.mkdir(mode=0o555)
    return str(directory)


def test_unwritable_output_names_the_output(tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(GOOD_LINES[:500])
    prefix = os.path.join(unwritable_directory(tmp_path), "ro")
    result = run_cli("preprocess_data", ["--quiet", "--input", str(corpus), "--output-prefix", prefix,
                                         "--tokenizer-model", tokenizer_dir, "--workers", "1"])
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert f"{prefix}_text_document.bin: cannot write: " in line
    assert any(reason in line for reason in ("Permission denied", "Operation not permitted", "Read-only file system"))


def test_a_failed_second_output_removes_the_first(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """--json-keys text url: when the url pair cannot be finalized, the finished text pair is removed too."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}", "url": f"u{i}"}) + "\n" for i in range(50)))
    original = IndexedDatasetWriter.finalize

    def failing(self):  # what the real finalize raises when the disk is full
        if self.prefix.endswith("_url_document"):
            raise DatasetWriteError(self.idx_path, OSError(28, "No space left on device"))
        original(self)

    monkeypatch.setattr(IndexedDatasetWriter, "finalize", failing)
    assert preprocessing.main(["--quiet", "--input", str(corpus), "--output-prefix", str(tmp_path / "out" / "k"),
                               "--tokenizer-model", tokenizer_dir, "--workers", "1", "--json-keys", "text", "url"]) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert outputs(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------
# SFT preprocessing.


def sft_mixture(directory, data_file: str) -> str:
    mixture = os.path.join(str(directory), "mixture.yaml")
    with open(mixture, "w") as f:
        f.write(f"seq_length: 128\nover_length: truncate\ndatasets:\n"
                f"  - {{name: databricks/databricks-dolly-15k, path: {data_file}}}\n")
    return mixture


def test_sft_damaged_gzip_is_named_and_skippable(tokenizer_dir, tmp_path, capsys):
    dolly = write_instruction_set(str(tmp_path / "dolly.jsonl"), max_examples=200)["path"]
    with open(dolly, "rb") as f:
        data = gzip.compress(f.read(), mtime=0)
    damaged = tmp_path / "dolly.jsonl.gz"
    damaged.write_bytes(data[: len(data) * 2 // 3])
    mixture = sft_mixture(tmp_path, str(damaged))
    args = ["--quiet", "--mixture", mixture, "--tokenizer", tokenizer_dir,
            "--output-prefix", str(tmp_path / "out" / "s")]
    assert sft_preprocessing.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{damaged}, line " in line and "truncated gzip file" in line
    assert outputs(tmp_path / "out") == []
    assert sft_preprocessing.main([*args, "--skip-bad-records"]) == 0
    summary = json.load(open(tmp_path / "out" / "s_summary.json"))["datasets"][0]
    assert summary["skipped_bad"] == 1 and 0 < summary["written"] < 200


def test_sft_full_disk_names_the_output_and_leaves_nothing(tokenizer_dir, tmp_path):
    dolly = write_instruction_set(str(tmp_path / "dolly.jsonl"), max_examples=300)["path"]
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("preprocess_sft_data", ["--quiet", "--mixture", sft_mixture(tmp_path, dolly), "--tokenizer",
                                             tokenizer_dir, "--output-prefix", str(out / "s")], limit_file_size=16_000)
    assert result.returncode == 1
    assert f"{out / 's'}_text_document.bin: cannot write: File too large" in one_error_line(result.stderr)
    assert outputs(out) == []


# ---------------------------------------------------------------------------------------
# Token ids outside the model's vocabulary, found when the trainer opens the data.


def test_out_of_range_token_id_is_found_when_training_opens_the_data(tmp_path):
    prefix = str(tmp_path / "ids_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for d in range(20):
            writer.add_document(np.arange(40) % 100)
        writer.add_document(np.array([5, 6, 700, 7] + [1] * 36))  # 700 >= lime-tiny's 512 ids
    args = parse_training_args(["--model", "lime-tiny", "--data-path", prefix, "--seq-length", "16",
                                "--split", "1,0,0", "--micro-batch-size", "1", "--global-batch-size", "1",
                                "--train-iters", "10"])
    assert args.model.vocab_size < 700
    with pytest.raises(IndexedDatasetError) as error:
        build_datasets(*dataset_spec(args, (10, 0, 0), pad_id=0, eod_id=1))
    assert str(error.value).startswith(f"{prefix}.bin: token id 700 (document 20, token 2; 1 such ids in all)")
    assert "\n" not in str(error.value)
