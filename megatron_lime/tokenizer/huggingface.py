"""The Hugging Face form of a tokenizer: sentencepiece models as `tokenizers` backends (ours losslessly,
any other through transformers' converter). LimeTokenizer.save_hf (core.py) writes the export's files."""

from __future__ import annotations

from typing import Any

from megatron_lime.errors import LimeInputError


def sentencepiece_bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce sentencepiece's BPE segmentation in the `tokenizers` library.

    sentencepiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece in the vocabulary. A `tokenizers` BPE applies the lowest-ranked
    merge first, so every split of every piece into two pieces becomes a merge, ranked by
    the merged piece's score (ties: by the parts' ids, a fixed order).
    """
    get = vocab.get
    ranked: list[tuple[float, int, int]] = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left = get(piece[:cut])
            if left is not None:
                right = get(piece[cut:])
                if right is not None:
                    ranked.append((-score, left, right))
    ranked.sort()
    pieces = {piece_id: piece for piece, piece_id in vocab.items()}
    return [(pieces[left], pieces[right]) for _, left, right in ranked]


def _special_pieces(proto: Any) -> list[str]:
    piece_type = type(proto.pieces[0]) if proto.pieces else None
    kinds = (piece_type.CONTROL, piece_type.UNKNOWN, piece_type.USER_DEFINED) if piece_type else ()
    return [p.piece for p in proto.pieces if p.type in kinds]


def lossless_sentencepiece_backend(proto: Any) -> Any:
    """Our lossless sentencepiece BPE as a `tokenizers.Tokenizer` with the same ids."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise LimeInputError("only sentencepiece BPE models without whitespace escaping can be exported this way")
    piece_type = sp_pb2.ModelProto.SentencePiece
    vocab, normal_vocab, scores, unk_piece = {}, {}, {}, None
    for i, p in enumerate(proto.pieces):  # one pass: reading protobuf fields is the slow part
        piece, kind = p.piece, p.type
        vocab[piece] = i
        if kind == piece_type.NORMAL:
            normal_vocab[piece], scores[piece] = i, p.score
        elif kind == piece_type.UNKNOWN and unk_piece is None:
            unk_piece = piece
    merges = sentencepiece_bpe_merges(normal_vocab, scores)

    # No normaliser and no pre-tokeniser: sentencepiece (identity rule, escape_whitespaces off)
    # runs BPE over the raw characters, and characters outside the vocabulary become bytes.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_piece, byte_fallback=True,
                                   fuse_unk=True, dropout=None))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _special_pieces(proto)])
    return backend


def converted_sentencepiece_backend(proto: Any, path: str) -> Any:
    """Any other sentencepiece model (BPE or unigram, with its normaliser, whitespace escaping and dummy
    prefix) through transformers' converter, which follows the model's own settings."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken

    try:
        from transformers.convert_slow_tokenizer import SpmConverter

        build = SpmConverter.build_tokenizer_from_spm_proto
    except (ImportError, AttributeError):
        raise LimeInputError(f"tokenizer {path}: converting a sentencepiece model with whitespace escaping or a dummy "
                             "prefix needs transformers >= 5 (SpmConverter.build_tokenizer_from_spm_proto)") from None
    model_type = proto.trainer_spec.model_type
    if model_type == sp_pb2.TrainerSpec.BPE:
        vocab: Any = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif model_type == sp_pb2.TrainerSpec.UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        kind = sp_pb2.TrainerSpec.ModelType.Name(model_type)
        raise LimeInputError(f"tokenizer {path}: a sentencepiece {kind} model has no Hugging Face equivalent; "
                             "only BPE and unigram models are supported")
    # legacy=True: the dummy prefix before every text piece between special tokens, as the SFT
    # template encodes each piece on its own with sentencepiece.
    backend = build(proto, vocab, legacy=True)
    if backend is None:
        raise LimeInputError(f"tokenizer {path}: transformers could not convert this sentencepiece model")
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _special_pieces(proto)])
    return backend
