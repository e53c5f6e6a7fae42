"""Training our lossless sentencepiece BPE tokenizer (tools/train_tokenizer.py is the command line around this)."""

from __future__ import annotations

import os
from typing import Iterable

from megatron_lime.errors import LimeInputError
from megatron_lime.files import write_bytes, write_json
from megatron_lime.tokenizer.core import SentencePieceTokenizer
from megatron_lime.tokenizer.spec import SENTENCEPIECE_FILE, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], output_dir: str, vocab_size: int = 50_000, num_threads: int = 1,
                    max_document_chars: int = 100_000, verbose: bool = False) -> str:
    """Train a lossless sentencepiece BPE tokenizer and write our tokenizer directory; returns it.

    `output_dir` gets `tokenizer.model` (sentencepiece), the Hugging Face files
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and `tokenizer_info.json`
    (special ids, training settings). vocab_size counts everything: the 6 special tokens,
    the 256 byte pieces and the learned pieces.
    """
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    num_reserved = len(SPECIAL_TOKENS.as_list()) + 256
    if vocab_size <= num_reserved:
        raise LimeInputError(f"vocab_size {vocab_size} must exceed the {num_reserved} special and byte pieces")
    num_documents = 0
    # sentencepiece turns an exception raised by the iterator into a bare RuntimeError;
    # keep the original (a BadRecordError naming file and line) to re-raise it.
    reader_errors: list[Exception] = []

    def documents() -> Iterable[str]:
        nonlocal num_documents
        try:
            for text in texts:
                if text:
                    num_documents += 1
                    # sentencepiece skips sentences longer than max_sentence_length; cutting keeps the rest.
                    yield text[:max_document_chars]
        except Exception as e:
            reader_errors.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents()),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            split_by_unicode_script=True,
            max_sentence_length=4 * max_document_chars,  # in bytes
            pad_id=0, pad_piece=SPECIAL_TOKENS.pad,
            eos_id=1, eos_piece=SPECIAL_TOKENS.eos,
            unk_id=2, unk_piece=SPECIAL_TOKENS.unk,
            bos_id=-1,
            # Control symbols get single ids but are never produced from raw text by encode().
            control_symbols=[SPECIAL_TOKENS.user, SPECIAL_TOKENS.assistant, SPECIAL_TOKENS.context],
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,  # 0: sentencepiece logs its progress
        )
    except RuntimeError:
        if reader_errors:
            raise reader_errors[0] from None
        if num_documents == 0:
            raise LimeInputError("no non-empty documents to train the tokenizer on") from None
        raise
    if reader_errors:
        raise reader_errors[0]
    if num_documents == 0:
        raise LimeInputError("no non-empty documents to train the tokenizer on")

    # Lossless rewrite (module docstring): pieces hold real spaces, no meta-symbol escaping.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.normalizer_spec.escape_whitespaces = False
    proto.denormalizer_spec.escape_whitespaces = False
    for piece in proto.pieces:
        if piece.type == sp_pb2.ModelProto.SentencePiece.NORMAL:
            piece.piece = piece.piece.replace("\u2581", " ")

    os.makedirs(output_dir, exist_ok=True)
    model_file = os.path.join(output_dir, SENTENCEPIECE_FILE)
    write_bytes(model_file, proto.SerializeToString())
    tokenizer = SentencePieceTokenizer(model_file, path=output_dir)
    tokenizer.save_hf(output_dir)
    info = {
        "library": f"sentencepiece {spm.__version__}",
        "model_type": "bpe",
        "vocab_size": tokenizer.vocab_size,
        "special_ids": tokenizer.special_ids(),
        "trained_on_documents": num_documents,
        "lossless": True,
    }
    write_json(os.path.join(output_dir, "tokenizer_info.json"), info, sort_keys=False)
    return output_dir
