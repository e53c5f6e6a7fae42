"""Content hashes of checkpoint files: recorded when a save writes them, checked before anything reads them.

A record is the "files" entry of a completion record (lime_config.json of a DeepSpeed tag or a
consolidated folder, lime_run.json of a Hugging Face export): {name relative to the folder: "sha256:<hex>"}.
The algorithm travels in every value, so a reader never guesses it.

The hash (benchmarks/bench_checkpoint.py measures them): xxh3_128 from the optional xxhash package for
training checkpoints, 26 GB/s here against SHA-256's 1.8 and BLAKE2b's 0.9 (2026-12-07), so a save grows by a
few percent (3.7% of a lime-125m save measured, +3.2% projected for lime-1b); without
xxhash, SHA-256 (hashlib; about twice BLAKE2b here, the CPU has SHA extensions). Exports always use
SHA-256: their own loading code (hf_files/modeling_lime.py, which must not import megatron_lime)
checks them with the standard library alone. A non-cryptographic hash is enough: the threat is a
changed byte (a bad drive, a network filesystem, a half-synced copy), not a forger.

Who hashes what: every rank hashes the files it wrote itself, right after writing them (they are still
in the page cache), and rank 0 writes the ranks' records gathered into the completion record
(training/checkpointing.py). Nothing re-reads another rank's files at save time.

Checkpoints written before records existed have no "files": they load after one warning per folder.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Iterable

from megatron_lime.checkpoint.format import CheckpointError

logger = logging.getLogger(__name__)

try:  # optional: about 5x SHA-256's rate here (benchmarks/bench_checkpoint.py); SHA-256 without it
    import xxhash
except ImportError:
    xxhash = None

# Training checkpoints (written every few hundred steps, many GB) use the fastest hash available; an export is
# written once and checked by its own stdlib-only loading code, so it always uses SHA-256.
HASH_ALGORITHM = "xxh3_128" if xxhash is not None else "sha256"
EXPORT_HASH_ALGORITHM = "sha256"
RECORD_KEY = "files"  # the completion record's entry holding the hashes
_CHUNK = 64 << 20
_warned: set[str] = set()


def _hasher(algorithm: str):
    if algorithm.startswith("xxh"):
        if xxhash is None or not hasattr(xxhash, algorithm):
            raise ValueError(f"{algorithm} needs the xxhash package (pip install xxhash)")
        return getattr(xxhash, algorithm)()
    return hashlib.new(algorithm)


def file_hash(path: str | os.PathLike, algorithm: str = HASH_ALGORITHM) -> str:
    """"<algorithm>:<hex digest>" of a file's bytes, hashed through a read-only memory map: no copy out of the
    page cache (2-3x the rate of reading into a buffer, measured here)."""
    digest = _hasher(algorithm)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size:
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for offset in range(0, size, _CHUNK):
                        digest.update(view[offset:offset + _CHUNK])
                finally:
                    view.release()
    return f"{algorithm}:{digest.hexdigest()}"


def hash_files(folder: str | os.PathLike, paths: Iterable[str | os.PathLike],
               algorithm: str = HASH_ALGORITHM) -> dict[str, str]:
    """{path relative to `folder`: file_hash} for files just written (missing ones are skipped)."""
    return {os.path.relpath(p, folder): file_hash(p, algorithm) for p in paths if os.path.isfile(p)}


def check_file(folder: str | os.PathLike, name: str, expected: str) -> str | None:
    """None when `folder/name` holds what the record says, else the one-line reason naming the file."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path}: missing (the completion record lists it with {expected})"
    algorithm, _, _ = expected.partition(":")
    try:
        found = file_hash(path, algorithm)
    except ValueError as err:
        return f"{path}: cannot check its recorded hash {expected[:60]}: {err}"
    if found != expected:
        return (f"{path}: content hash mismatch: expected {expected}, found {found} "
                f"(the file changed after it was saved)")
    return None


def record_of(meta: dict | None) -> dict[str, str] | None:
    """The "files" record of a completion record, None when it has none (written before records existed)."""
    record = (meta or {}).get(RECORD_KEY)
    return record if isinstance(record, dict) else None


def warn_unverified(folder: str | os.PathLike) -> None:
    """The one warning for a checkpoint written before content hashes were recorded."""
    folder = os.path.normpath(str(folder))
    if folder not in _warned:
        _warned.add(folder)
        logger.warning("%s: written before checkpoints recorded content hashes: loading it unverified", folder)


def verify(folder: str | os.PathLike, meta: dict | None, names: Iterable[str] | None = None) -> bool:
    """Check the files `names` of `folder` (all that the record lists when None) against the record in `meta`.

    Raises CheckpointError (one line: file, expected and found hash) at the first bad file; returns False,
    after warn_unverified, when the record is absent (an old checkpoint), True when all matched.
    """
    record = record_of(meta)
    if record is None:
        warn_unverified(folder)
        return False
    for name in record if names is None else names:
        if name not in record:
            raise CheckpointError(f"{os.path.join(folder, name)}: not in the completion record's file list "
                                  f"(not written by the save that completed this checkpoint)")
        problem = check_file(folder, name, record[name])
        if problem:
            _refuse_if_unsafe(os.path.join(folder, name))
            raise CheckpointError(problem)
    return True


def _refuse_if_unsafe(path: str) -> None:
    """A changed .pt file that would run code is named as such (the safe loader's message), not only as changed."""
    from megatron_lime.checkpoint.safe_load import UnsafeFileError, torch_load

    if path.endswith(".pt") and os.path.isfile(path):
        try:
            torch_load(path)
        except UnsafeFileError:
            raise
        except CheckpointError:
            pass


def problems(folder: str | os.PathLike, meta: dict | None, first_only: bool = False) -> list[str]:
    """Every bad file of `folder` as one line each (only the first with `first_only`); [] when all are good."""
    found = []
    for name, expected in sorted((record_of(meta) or {}).items()):
        problem = check_file(folder, name, expected)
        if problem:
            found.append(problem)
            if first_only:
                break
    return found


@dataclass
class FolderReport:
    """What check_folder found: the folders checked, their files and bytes, the bad files, the unverifiable."""

    checked: list[str] = field(default_factory=list)  # folders with a record, checked
    files: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)  # one line per bad file
    unverified: list[str] = field(default_factory=list)  # folders without a record (written before records)


def check_folder(path: str | os.PathLike, first_only: bool = True) -> FolderReport:
    """Check every recorded file under a checkpoint folder of any layout: each complete tag of a DeepSpeed save
    dir (or the one tag dir given), a consolidated folder, a Hugging Face export. Stops at the first bad file
    with `first_only`."""
    from megatron_lime.checkpoint.format import (EXPORT_RUN_FILE, LIME_CONFIG, MODEL_STATES, detect_layout,
                                                 read_lime_config, tag_dirs)

    path = str(path)
    if os.path.isfile(os.path.join(path, MODEL_STATES)) and os.path.isfile(os.path.join(path, LIME_CONFIG)):
        folders = [(path, os.path.join(path, LIME_CONFIG))]  # one tag folder
    else:
        layout = detect_layout(path)
        if layout == "deepspeed":
            complete, _ = tag_dirs(path)
            folders = [(os.path.join(path, tag), os.path.join(path, tag, LIME_CONFIG)) for tag in complete]
        else:
            folders = [(path, os.path.join(path, EXPORT_RUN_FILE if layout == "hf" else LIME_CONFIG))]
    report = FolderReport()
    for folder, record_file in folders:
        meta = read_lime_config(record_file) if os.path.isfile(record_file) else None
        record = record_of(meta)
        if record is None:
            report.unverified.append(folder)
            continue
        report.checked.append(folder)
        for name, expected in sorted(record.items()):
            problem = check_file(folder, name, expected)
            report.files += 1
            if problem:
                report.bad.append(problem)
                if first_only:
                    return report
            else:
                report.bytes += os.path.getsize(os.path.join(folder, name))
    return report
