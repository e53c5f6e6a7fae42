"""The LIME tokenizer: load it, encode raw text losslessly, export it for Hugging Face.

Three kinds of path load (`load_tokenizer`):
  * our tokenizer directory, written by tools/train_tokenizer.py: `tokenizer.model`
    (sentencepiece, used for encoding: it is the fastest) plus the Hugging Face files;
  * a user's own sentencepiece `.model` file;
  * a Hugging Face tokenizer directory (`tokenizer.json`, loaded with the `tokenizers` library).

`encode(text)` never adds special tokens, and the special strings (`<eos>`, `<user>`, ...)
inside raw text are NOT turned into their special ids: pretraining text that happens to
contain "<eos>" must not end a document. The Hugging Face export is the other way round:
`AutoTokenizer(...)("<user>" + question + "<assistant>")` maps the tags to their single ids,
which is how the model card prompts the model.

Why our sentencepiece model is lossless (decode(encode(text)) == text for any UTF-8 text):
  * identity normalisation, no dummy prefix, no whitespace collapsing, byte fallback, so
    every character is either a piece or its UTF-8 bytes;
  * sentencepiece writes spaces as the meta symbol U+2581 inside pieces, so a literal U+2581
    in the text would decode as a space. tools/train_tokenizer.py therefore rewrites the
    trained model: pieces hold real spaces and `escape_whitespaces` is off; a literal U+2581
    then falls back to its three bytes. The rewrite changes no ids for text without U+2581
    (tests/test_tokenizer.py checks this on a corpus).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class SpecialTokens:
    """The special token strings of LIME tokenizers, in id order (ids 0..5 in ours)."""

    pad: str = "<pad>"
    eos: str = "<eos>"
    unk: str = "<unk>"
    user: str = "<user>"
    assistant: str = "<assistant>"
    context: str = "<context>"

    def as_list(self) -> list[str]:
        return [self.pad, self.eos, self.unk, self.user, self.assistant, self.context]


SPECIAL_TOKENS = SpecialTokens()
SENTENCEPIECE_FILE = "tokenizer.model"
# Longest prompt + response the exported tokenizer announces (the model's context length).
MODEL_MAX_LENGTH = 512


class LimeTokenizer:
    """A tokenizer with the ids the rest of megatron-lime needs.

    Attributes:
        vocab_size: number of ids (rows the embedding needs).
        eos_id, pad_id: always set (pad falls back to eos for foreign tokenizers without one).
        user_id, assistant_id, context_id: the SFT tags' ids, or None if the tokenizer lacks them.
        path: what it was loaded from.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    user_id: int | None
    assistant_id: int | None
    context_id: int | None
    path: str

    def encode(self, text: str) -> list[int]:
        """Ids of raw text: no special tokens added, special strings in the text stay plain text."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def save_hf(self, output_dir: str) -> None:
        """Write files that `AutoTokenizer.from_pretrained(output_dir)` loads offline, giving the same ids."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "eos": self.eos_id, "user": self.user_id,
                "assistant": self.assistant_id, "context": self.context_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class SentencePieceTokenizer(LimeTokenizer):
    """A sentencepiece model: ours (tokenizer.model in our directory) or a user's own `.model` file."""

    def __init__(self, model_file: str, path: str | None = None):
        import sentencepiece as spm

        self.model_file = model_file
        self.path = path or model_file
        self.processor = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.processor.get_piece_size()

        def piece_id(piece: str) -> int | None:
            # piece_to_id answers unk_id for unknown pieces; only a real match counts.
            i = self.processor.piece_to_id(piece)
            return i if self.processor.id_to_piece(i) == piece else None

        eos = self.processor.eos_id()
        if eos < 0:
            eos = piece_id(SPECIAL_TOKENS.eos) if piece_id(SPECIAL_TOKENS.eos) is not None else piece_id("</s>")
        if eos is None or eos < 0:
            raise ValueError(f"{model_file}: the sentencepiece model has no end-of-sequence piece (eos_id is -1)")
        self.eos_id = eos
        pad = self.processor.pad_id()
        self.pad_id = pad if pad >= 0 else eos
        unk = self.processor.unk_id()
        self.unk_id = unk if unk >= 0 else None
        self.user_id = piece_id(SPECIAL_TOKENS.user)
        self.assistant_id = piece_id(SPECIAL_TOKENS.assistant)
        self.context_id = piece_id(SPECIAL_TOKENS.context)

    def encode(self, text: str) -> list[int]:
        # Our special tokens are sentencepiece control symbols, which encode() never produces
        # from text, so "<eos>" in raw text becomes ordinary pieces.
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One C++ call for the whole batch; threads stay at 1 because preprocessing
        # already runs one worker process per core.
        return self.processor.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(int(token_id))

    def save_hf(self, output_dir: str) -> None:
        write_hf_tokenizer_files(self.model_file, output_dir)


class HuggingFaceTokenizer(LimeTokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json), driven through the `tokenizers` library."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer

        tokenizer_json = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(
                f"{directory}: not a tokenizer we can load: no {SENTENCEPIECE_FILE} and no tokenizer.json "
                "(slow-only Hugging Face tokenizers are not supported; save it with a fast tokenizer)"
            )
        self.path = directory
        self.backend = Tokenizer.from_file(tokenizer_json)
        # Raw text must never produce special ids (see the module docstring).
        self.backend.encode_special_tokens = True
        config = _read_json(os.path.join(directory, "tokenizer_config.json"), default={})
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"), default={})

        def token_string(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            if isinstance(value, dict):  # older files store {"content": "<eos>", ...}
                value = value.get("content")
            return value

        def token_id(token: str | None) -> int | None:
            return None if token is None else self.backend.token_to_id(token)

        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        eos = token_id(token_string("eos_token"))
        if eos is None:
            eos = token_id(SPECIAL_TOKENS.eos)
        if eos is None:
            raise ValueError(f"{directory}: the tokenizer has no eos_token (set it in tokenizer_config.json)")
        self.eos_id = eos
        pad = token_id(token_string("pad_token"))
        self.pad_id = pad if pad is not None else eos
        self.unk_id = token_id(token_string("unk_token"))
        self.user_id = token_id(SPECIAL_TOKENS.user)
        self.assistant_id = token_id(SPECIAL_TOKENS.assistant)
        self.context_id = token_id(SPECIAL_TOKENS.context)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self.backend.id_to_token(int(token_id))

    def save_hf(self, output_dir: str) -> None:
        import shutil

        os.makedirs(output_dir, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            source = os.path.join(self.path, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(os.path.join(output_dir, name)):
                shutil.copyfile(source, os.path.join(output_dir, name))


def load_tokenizer(path: str) -> LimeTokenizer:
    """Load our tokenizer directory, a sentencepiece `.model` file, or a Hugging Face tokenizer directory."""
    if os.path.isfile(path):
        if path.endswith(".json"):
            return HuggingFaceTokenizer(os.path.dirname(os.path.abspath(path)))
        return SentencePieceTokenizer(path)
    if os.path.isdir(path):
        model_file = os.path.join(path, SENTENCEPIECE_FILE)
        if os.path.isfile(model_file):
            return SentencePieceTokenizer(model_file, path=path)
        return HuggingFaceTokenizer(path)
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a directory or a sentencepiece .model file)")


# ---------------------------------------------------------------------------------------
# Hugging Face export of a sentencepiece BPE model.


def sentencepiece_bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce sentencepiece's BPE segmentation in the `tokenizers` library.

    sentencepiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece in the vocabulary. A `tokenizers` BPE applies the lowest-ranked
    merge first, so every split of every piece into two pieces becomes a merge, ranked by
    the merged piece's score (ties: by the parts' ids, a fixed order).
    """
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def write_hf_tokenizer_files(model_file: str, output_dir: str) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for a sentencepiece BPE model.

    The result loads with `AutoTokenizer.from_pretrained(output_dir)` offline (no remote code)
    as a fast tokenizer that gives the same ids as sentencepiece on raw text, and maps the
    special strings to their single ids.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models

    proto = sp_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: only sentencepiece BPE models can be exported to tokenizer.json")
    if proto.normalizer_spec.escape_whitespaces or proto.normalizer_spec.add_dummy_prefix:
        raise ValueError(
            f"{model_file}: not a lossless LIME tokenizer (escape_whitespaces/add_dummy_prefix set); "
            "train one with tools/train_tokenizer.py"
        )
    piece_type = sp_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == piece_type.NORMAL}
    normal_vocab = {piece: vocab[piece] for piece in scores}
    merges = sentencepiece_bpe_merges(normal_vocab, scores)
    unk_piece = next((p.piece for p in proto.pieces if p.type == piece_type.UNKNOWN), None)

    # No normaliser and no pre-tokeniser: sentencepiece (identity rule, escape_whitespaces off)
    # runs BPE over the raw characters, and characters outside the vocabulary become bytes.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_piece, byte_fallback=True,
                                   fuse_unk=True, dropout=None))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    special = [p.piece for p in proto.pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN, piece_type.USER_DEFINED)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])

    os.makedirs(output_dir, exist_ok=True)
    backend.save(os.path.join(output_dir, "tokenizer.json"))
    present = set(special)
    tokens = {
        "eos_token": SPECIAL_TOKENS.eos if SPECIAL_TOKENS.eos in present else None,
        "pad_token": SPECIAL_TOKENS.pad if SPECIAL_TOKENS.pad in present else None,
        "unk_token": unk_piece,
    }
    extra = [t for t in (SPECIAL_TOKENS.user, SPECIAL_TOKENS.assistant, SPECIAL_TOKENS.context) if t in present]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in tokens.items() if v is not None},
        "additional_special_tokens": extra,
        "model_max_length": MODEL_MAX_LENGTH,
        # Decoding must give the text back exactly: no " ." -> "." clean-up.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
    }
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    special_map = {**{k: v for k, v in tokens.items() if v is not None}, "additional_special_tokens": extra}
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _read_json(path: str, default: dict) -> dict:
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# Training (tools/train_tokenizer.py is the command line around this).


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
        raise ValueError(f"vocab_size {vocab_size} must exceed the {num_reserved} special and byte pieces")
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
            raise ValueError("no non-empty documents to train the tokenizer on") from None
        raise
    if reader_errors:
        raise reader_errors[0]
    if num_documents == 0:
        raise ValueError("no non-empty documents to train the tokenizer on")

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
    tmp_file = model_file + f".tmp-{os.getpid()}"
    with open(tmp_file, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp_file, model_file)
    write_hf_tokenizer_files(model_file, output_dir)
    tokenizer = SentencePieceTokenizer(model_file, path=output_dir)
    info = {
        "library": f"sentencepiece {spm.__version__}",
        "model_type": "bpe",
        "vocab_size": tokenizer.vocab_size,
        "special_ids": tokenizer.special_ids(),
        "trained_on_documents": num_documents,
        "lossless": True,
    }
    with open(os.path.join(output_dir, "tokenizer_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return output_dir
