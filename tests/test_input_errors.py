"""Bad input is one line: every command, given a bad input of its kind, prints `error: <message>` naming the file,
exits 1 (or the status it documents), prints no traceback and leaves no output under its final name.

Each command runs as a subprocess, as a user runs it (megatron_lime/errors.py: LimeInputError and
reports_input_errors; training: megatron_lime/training/failures.py). Also: every error class in
megatron_lime that reports input (a ValueError or an OSError) derives from LimeInputError.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, make_tiny_pretraining_data

import megatron_lime
from megatron_lime.errors import LimeInputError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(dataset prefix, tokenizer directory) of a tiny preprocessed corpus."""
    return make_tiny_pretraining_data(str(tmp_path_factory.mktemp("data")), num_docs=60)


def run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LIME_FAULT_INJECT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


def the_error_line(result: subprocess.CompletedProcess, names: str, status: int = 1) -> str:
    """The one `error:` line of a failed command, after checking its status, that it names `names`, no traceback."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert names in lines[0], lines[0]
    return lines[0]


def damaged_index(prefix: str, directory) -> str:
    """A copy of the dataset `prefix` whose .idx is cut short; returns the copy's .idx path."""
    os.makedirs(directory, exist_ok=True)
    copy = os.path.join(directory, "damaged_text_document")
    shutil.copyfile(prefix + ".bin", copy + ".bin")
    with open(prefix + ".idx", "rb") as source, open(copy + ".idx", "wb") as index:
        index.write(source.read(20))  # the header alone is 34 bytes
    return copy + ".idx"


def damaged_checkpoint(directory, tokenizer_dir: str) -> str:
    """A consolidated checkpoint whose model.safetensors is not a safetensors file; returns that file's path."""
    from megatron_lime.config import LimeConfig

    os.makedirs(directory)
    with open(os.path.join(directory, "lime_config.json"), "w") as config:
        json.dump({"model": LimeConfig.from_name("lime-tiny").to_dict(), "tokenizer": tokenizer_dir}, config)
    weights = os.path.join(directory, "model.safetensors")
    with open(weights, "wb") as f:
        f.write(b"not a safetensors file")
    return weights


def test_preprocess_a_bad_jsonl_line(data, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "cut short\n')
    out = tmp_path / "out"
    result = run("tools/preprocess_data.py", "--quiet", "--input", str(corpus), "--output-prefix", str(out / "d"),
                 "--tokenizer-model", data[1], "--workers", "1")
    assert "line 2: malformed JSON" in the_error_line(result, f"{corpus}: line 2")
    assert not out.exists() or os.listdir(out) == []


def test_sft_preprocess_a_record_missing_its_fields(data, tmp_path):
    rows = tmp_path / "dolly.jsonl"
    rows.write_text(json.dumps({"instruction": "Q", "context": "", "response": "A"}) + "\n"
                    + json.dumps({"instruction": "Q", "context": ""}) + "\n")
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"datasets:\n  - {{name: databricks/databricks-dolly-15k, path: {rows}}}\n")
    out = tmp_path / "out"
    result = run("tools/preprocess_sft_data.py", "--quiet", "--mixture", str(mixture), "--tokenizer-model", data[1],
                 "--output-prefix", str(out / "sft"))
    assert "missing column 'response'" in the_error_line(result, f"{rows}, line 2")
    assert not out.exists() or os.listdir(out) == []


def test_merge_a_damaged_index(data, tmp_path):
    index = damaged_index(data[0], tmp_path / "inputs")
    out = tmp_path / "out"
    result = run("tools/merge_datasets.py", "--input", data[0], index.removesuffix(".idx"),
                 "--output-prefix", str(out / "merged"))
    assert "truncated index" in the_error_line(result, index)
    assert not out.exists() or os.listdir(out) == []


def test_train_on_a_damaged_dataset(data, tmp_path):
    index = damaged_index(data[0], tmp_path / "inputs")
    save = tmp_path / "save"
    # The datasets are built before the model and the engine: the run stops a few seconds after start-up.
    result = run("pretrain_lime.py", "--model", "lime-tiny", "--num-layers", "1", "--seq-length", "32",
                 "--data-path", index.removesuffix(".idx"), "--tokenizer-model", data[1], "--save", str(save),
                 "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-interval", "0",
                 "--num-workers", "0", "--split", "100,0,0")
    assert "truncated index" in the_error_line(result, index)
    assert not save.exists() or os.listdir(save) == []


def test_convert_a_damaged_checkpoint(data, tmp_path):
    weights = damaged_checkpoint(tmp_path / "checkpoint", data[1])
    result = run("tools/convert_to_hf.py", "--load", str(tmp_path / "checkpoint"), "--output", str(tmp_path / "hf"))
    assert "not a readable safetensors file" in the_error_line(result, weights)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no export, no temporary folder left behind


def test_evaluate_a_missing_and_a_damaged_checkpoint(data, tmp_path):
    pytest.importorskip("lm_eval")
    output = tmp_path / "results.json"
    missing = tmp_path / "nowhere"
    result = run("tools/evaluate.py", "--load", str(missing), "--tasks", "arc_easy", "--output", str(output))
    assert "no such checkpoint directory" in the_error_line(result, str(missing))
    weights = damaged_checkpoint(tmp_path / "checkpoint", data[1])
    result = run("tools/evaluate.py", "--load", str(tmp_path / "checkpoint"), "--tasks", "arc_easy",
                 "--output", str(output))
    assert "not a readable safetensors file" in the_error_line(result, weights)
    assert not output.exists()


def test_verify_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    result = run("tools/verify_checkpoint.py", str(tmp_path))
    # Status 2, as tools/verify_checkpoint.py documents for a folder that is not a checkpoint.
    assert "not a LIME checkpoint" in the_error_line(result, str(tmp_path), status=2)


def test_an_unwritable_output(tmp_path):
    # Root ignores permission bits: sysfs refuses new files to everyone.
    place = "/sys/lime-cannot-write-here" if os.geteuid() == 0 else str(tmp_path / "read-only")
    if os.geteuid() != 0:
        os.mkdir(place, mode=0o555)
    output = os.path.join(place, "sample")
    result = run("tools/make_sample_data.py", "--output-dir", output, "--max-megabytes", "0.01",
                 "--max-sft-examples", "1")
    assert "cannot write" in the_error_line(result, output)


def test_other_exceptions_keep_their_traceback(tmp_path):
    # A bug is not bad input: the decorator lets it through, with its traceback.
    script = tmp_path / "buggy.py"
    script.write_text("from megatron_lime.errors import reports_input_errors\n\n"
                      "@reports_input_errors\ndef main(argv=None):\n    return {}['no such key']\n\nmain()\n")
    result = run(str(script))
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'no such key'" in result.stderr
    assert not any(line.startswith("error: ") for line in result.stderr.splitlines())


# ---------------------------------------------------------------------------------------------
# Every input error class derives from LimeInputError.


def source_modules() -> dict[str, str]:
    """{module name: path} of every Python file of megatron_lime, but hf_files/ (copied into exports, standalone:
    they raise transformers' and Python's own errors)."""
    root = os.path.dirname(megatron_lime.__file__)
    modules = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            module = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".").removesuffix(".__init__")
            if name.endswith(".py") and not module.startswith("megatron_lime.conversion.hf_files."):
                modules[module] = path
    return modules


def test_every_input_error_derives_from_lime_input_error():
    written, classes = set(), {}
    for module_name, path in source_modules().items():
        tree = ast.parse(open(path).read())
        written |= {f"{module_name}.{node.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ClassDef) and node.name.endswith("Error")}
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == module_name:
                classes[f"{module_name}.{value.__qualname__}"] = value
    assert written <= set(classes), written - set(classes)  # every class written is checked below
    # A ValueError or an OSError that megatron_lime defines reports input (a bug raises Python's own types).
    input_errors = {name: cls for name, cls in classes.items()
                    if name.endswith("Error") and issubclass(cls, (ValueError, OSError))}
    assert {"megatron_lime.checkpoint.format.CheckpointError", "megatron_lime.data.readers.BadRecordError",
            "megatron_lime.data.sft.mixture.MixtureError", "megatron_lime.data.filters.FilterValueError",
            "megatron_lime.data.indexed_dataset.DatasetWriteError"} <= set(input_errors)
    not_derived = sorted(name for name, cls in input_errors.items() if not issubclass(cls, LimeInputError))
    assert not_derived == [], f"input errors that do not derive from megatron_lime.errors.LimeInputError: {not_derived}"
