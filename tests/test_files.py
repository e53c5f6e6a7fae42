"""megatron_lime.files: the one atomic write / JSON helper, and the package's top-level names."""

import os

import pytest

from megatron_lime.files import TMP_MARK, atomic_directory, atomic_write, read_json, write_json


def test_atomic_write_replaces_whole_file_and_follows_umask(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_json(path, {"x": 2})
    assert read_json(path) == {"x": 2}
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert not [p for p in os.listdir(tmp_path) if TMP_MARK in p]


def test_read_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n"a": 1,\n}')
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid JSON"):
        read_json(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON: not UTF-8"):
        read_json(path)


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "f").write_text("two")
            raise RuntimeError("crash")
    assert (out / "f").read_text() == "one"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_top_level_names():
    from megatron_lime import LimeConfig, LimeModel
    from megatron_lime.model import LimeModel as SubpackageModel

    assert LimeModel is SubpackageModel
    assert LimeConfig.from_name("lime-tiny").num_layers == 2
