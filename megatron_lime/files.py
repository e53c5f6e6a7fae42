"""The one way this project writes a file: to a temporary name beside it, fsync, rename.

A reader (another rank, a resumed run, a user's `ls`) sees either the old file or the whole new
one, never a prefix; a crash leaves at most a `.NAME.tmp-*` file, which nothing reads. Files are
created with `open()`'s default mode, so they follow the user's umask like everything else.

    with atomic_write("out/index.npy", "wb") as f: np.save(f, array)
    write_json("out/config.json", {...})
    read_json("out/config.json")          # ValueError "FILE:LINE: not valid JSON: ..." on bad input
    with atomic_directory("hf-out") as tmp: ...   # a whole folder, renamed into place at the end
    cache_folder()                        # where derived, recomputable data is kept between runs
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any, Iterator

from megatron_lime.errors import LimeInputError, OutputWriteError

TMP_MARK = ".tmp-"  # every temporary name this module makes contains it
CACHE_ENV = "MEGATRON_LIME_CACHE"


def cache_folder() -> Path | None:
    """Where derived data that can always be recomputed is kept (a tokenizer's converted form, the kernel
    choices): $MEGATRON_LIME_CACHE, else $XDG_CACHE_HOME/megatron-lime, else ~/.cache/megatron-lime.
    None when caching is off (MEGATRON_LIME_CACHE=off)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron-lime"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{time.monotonic_ns()}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry), where the OS allows opening directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_output(path: str | os.PathLike, error_type: type[OutputWriteError] = OutputWriteError) -> Iterator[None]:
    """Re-raise an OSError while writing `path` as an `error_type` (OutputWriteError or a package's subclass of
    it) that names `path` (not its temporary name)."""
    try:
        yield
    except error_type:
        raise
    except OSError as err:
        raise error_type(str(path), err) from err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success fsync it and rename it to `path`.

    On an exception the temporary file is removed and `path` is left as it was. Creating, flushing or
    renaming the file (a read-only or full disk) raises OutputWriteError; what the caller's block raises,
    it raises as it is.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with naming_output(path):
            handle = open(tmp, mode, encoding=None if "b" in mode else encoding)
        with handle:
            yield handle
            with naming_output(path):
                handle.flush()
                os.fsync(handle.fileno())
        with naming_output(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written by a library that ignores the umask (safetensors creates 0600) the mode open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a malformed one raises LimeInputError (a ValueError) naming the file, line and reason."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise LimeInputError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise LimeInputError(f"{path}: not valid JSON: not UTF-8 text ({err.reason} at byte {err.start})") from err


class atomic_directory:
    """`with atomic_directory(out) as tmp:` fill tmp; on success tmp replaces out, on error it is removed.

    Readers never see a half-written `out`: the final step is a rename within one filesystem.
    An existing `out` is replaced only after the new one is complete. Whether an existing `out`
    may be replaced at all is the caller's decision (see conversion's --overwrite checks).
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).absolute()
        self.tmp = _tmp_name(self.target)

    def __enter__(self) -> Path:
        with naming_output(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        try:
            with naming_output(self.target):
                if self.target.exists():
                    old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                    os.rename(self.target, old)
                os.rename(self.tmp, self.target)
        except OutputWriteError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not self.target.exists():
                os.rename(old, self.target)  # the earlier output stays as it was
            raise
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old)
