"""A standard sentencepiece model's converted form, computed once per model and kept on disk.

Loading a sentencepiece model that is not ours (ConvertedSentencePieceTokenizer) needs its
tokenizers-library conversion (huggingface.converted_sentencepiece_backend: importing transformers
takes about 0.5 s, converting a 32k model 0.2 s) and its agreement with sentencepiece (agreement.py:
0.3 s). Preprocessing a corpus in shards, SFT preprocessing, training and evaluation each load the
model again; from the cache it loads in about 0.1 s (tokenizers parses the saved form), and
nothing of transformers is imported.

The folder: $MEGATRON_LIME_CACHE, else $XDG_CACHE_HOME/megatron-lime, else ~/.cache/megatron-lime;
MEGATRON_LIME_CACHE=off computes the form every time. An entry (sentencepiece/KEY.txt) is named by a
hash of the model's bytes, the installed transformers and tokenizers versions, and the source of the
modules that compute it, so a new version of any of them makes a new entry. Its first line is the
BLAKE2b hash of the rest: a damaged entry is computed again and rewritten, never used. Entries are
written through files.py (whole or not at all), so shards loading the same model at once are safe.
A folder that cannot be written costs one warning and the computation, never the run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from megatron_lime.files import CACHE_ENV, cache_folder, write_text
from megatron_lime.tokenizer import agreement as agreement_module
from megatron_lime.tokenizer import huggingface as huggingface_module
from megatron_lime.tokenizer.agreement import SentencePieceAgreement, sentencepiece_agreement
from megatron_lime.tokenizer.huggingface import converted_sentencepiece_backend

ENTRY_FORMAT = 1  # bump when an entry's layout or meaning changes


def entry_key(model_proto: bytes) -> str:
    """What the converted form depends on: the model, the converting libraries and our converting code."""
    h = hashlib.blake2b(model_proto, digest_size=20)
    for dist in ("transformers", "tokenizers"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"\0{dist}={version}".encode())
    for module in (agreement_module, huggingface_module):
        h.update(Path(module.__file__).read_bytes())
    h.update(f"\0format={ENTRY_FORMAT}".encode())
    return h.hexdigest()


def _body_hash(body: str) -> str:
    return hashlib.blake2b(body.encode("utf-8"), digest_size=20).hexdigest()


def read_entry(path: Path) -> tuple[Any, SentencePieceAgreement] | None:
    """(backend, agreement) from an entry; None when it is missing or damaged."""
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    checksum, _, body = text.partition("\n")
    if checksum != _body_hash(body):
        print(f"warning: {path}: damaged tokenizer cache entry (its hash does not match); computing it again",
              file=sys.stderr)
        return None
    agreement_line, _, backend_json = body.partition("\n")
    return Tokenizer.from_str(backend_json), SentencePieceAgreement.from_json(json.loads(agreement_line))


def write_entry(path: Path, backend: Any, agreement: SentencePieceAgreement) -> None:
    body = json.dumps(agreement.to_json(), ensure_ascii=False) + "\n" + backend.to_str()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, _body_hash(body) + "\n" + body)
    except OSError as err:
        print(f"warning: tokenizer cache not written ({path}: {err.strerror or err}); the converted form is "
              f"computed on every load (set {CACHE_ENV} to a writable folder, or to 'off' to silence this)",
              file=sys.stderr)


def converted_form(proto: Any, model_proto: bytes, path: str) -> tuple[Any, SentencePieceAgreement]:
    """(the model's tokenizers-library conversion, its agreement with sentencepiece), from the cache when there."""
    folder = cache_folder()
    entry = folder / "sentencepiece" / f"{entry_key(model_proto)}.txt" if folder is not None else None
    cached = read_entry(entry) if entry is not None else None
    if cached is not None:
        return cached
    backend = converted_sentencepiece_backend(proto, path)
    agreement = sentencepiece_agreement(proto)
    if entry is not None:
        write_entry(entry, backend, agreement)
    return backend, agreement
