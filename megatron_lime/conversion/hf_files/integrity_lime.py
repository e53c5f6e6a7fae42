"""Integrity check of a LIME export (shipped inside every export, used by modeling_lime.py's from_pretrained).

Standalone: the standard library and transformers' logger only, never megatron_lime. The export's
record, lime_run.json, holds {"files": {name: "sha256:<hex>"}} for every other file of the folder,
written when the export was made; megatron_lime.checkpoint.integrity makes and checks the same
records (this is the copy that travels with the export, which must stand alone).
"""

from __future__ import annotations

import hashlib
import json
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)

EXPORT_RECORD = "lime_run.json"
_CHUNK = 16 << 20


def file_hash(path: str, algorithm: str) -> str:
    """"<algorithm>:<hex digest>" of a file's bytes."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def verify_local_export(folder) -> bool:
    """Check every file an export folder's record lists; ValueError (one line: the file, the expected and the
    found hash) at the first that differs. False, after a warning, for a folder without a record, and for
    anything that is not a local folder (a Hub id: transformers' own download checks apply)."""
    if folder is None or not os.path.isdir(str(folder)):
        return False
    folder = str(folder)
    try:
        with open(os.path.join(folder, EXPORT_RECORD), encoding="utf-8") as handle:
            files = json.load(handle).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not isinstance(files, dict):
        logger.warning("%s: no content hashes recorded (%s): loading it unverified", folder, EXPORT_RECORD)
        return False
    for name, expected in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing ({EXPORT_RECORD} lists it with {expected})")
        try:
            found = file_hash(path, str(expected).partition(":")[0])
        except ValueError:
            raise ValueError(f"{path}: {EXPORT_RECORD} records it with an unknown hash "
                             f"({str(expected)[:40]})") from None
        if found != expected:
            raise ValueError(f"{path}: content hash mismatch: expected {expected}, found {found} "
                             f"(the file changed after it was saved)")
    return True
