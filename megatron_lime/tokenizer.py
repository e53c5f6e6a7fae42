"""The LIME tokenizer: load it (ours or the user's own), encode raw text, export it for Hugging Face.

Kinds, named by Megatron-LM's --tokenizer-type (flags: add_tokenizer_args / TokenizerSpec, the
same in every tool; tools call build_tokenizer, which refuses what could not be exported):
  * our tokenizer directory, written by tools/train_tokenizer.py: `tokenizer.model` (lossless
    sentencepiece, used for encoding: it is the fastest) plus the Hugging Face files;
  * any other sentencepiece `.model` (SentencePieceTokenizer): BPE or unigram, with its own
    normaliser, whitespace escaping and dummy prefix, used in the form transformers converts it to;
  * a Hugging Face tokenizer directory (HuggingFaceTokenizer: tokenizer.json, or anything
    AutoTokenizer loads as a fast tokenizer);
  * GPT-2's vocab.json + merges.txt (GPT2BPETokenizer).
Whatever the kind, the export (save_hf) writes the `tokenizers` form the data was encoded with,
so the exported tokenizer gives exactly the ids preprocessing wrote. with_chat_tokens() adds
<user>, <assistant>, <context> as new ids after the last one when a tokenizer lacks them
(SFT preprocessing, training and the export all add them the same way).

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
from typing import Any, Iterable, Sequence


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


# Megatron-LM's --tokenizer-type names. The sentencepiece ones all load a sentencepiece .model
# (or our directory); HuggingFaceTokenizer a folder AutoTokenizer loads; GPT2BPETokenizer a
# vocab.json + merges.txt pair (--vocab-file, --merge-file).
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = (*SENTENCEPIECE_TYPES, "HuggingFaceTokenizer", "GPT2BPETokenizer")
# A folder holding these (and no tokenizer.json) loads as GPT2BPETokenizer: checkpoints record it so.
GPT2_FILES = ("vocab.json", "merges.txt")
CHAT_TOKENS = (SPECIAL_TOKENS.user, SPECIAL_TOKENS.assistant, SPECIAL_TOKENS.context)
# Text a sentencepiece model's Hugging Face conversion must encode exactly as sentencepiece does
# before any tool accepts the model: whitespace runs, leading/trailing spaces, newlines and tabs,
# digits, punctuation, accents, CJK, emoji, a character outside any small vocabulary.
CONVERSION_PROBE = ("  Hello,  world!\n\tThe year 2025: naïve café, \u00bd cup.  \n\n"
                    "  x  \u4e2d\u6587 \U0001F600 \u2581meta <b>tag</b> end  ")


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """Which tokenizer, in Megatron-LM's flags; every tool takes these (add_tokenizer_args)."""

    tokenizer_type: str | None = None  # None: read off tokenizer_model (our folder, a .model, a HF folder)
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> "TokenizerSpec":
        return cls(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                   vocab_file=args.vocab_file, merge_file=args.merge_file)

    def describe(self) -> str:
        if self.tokenizer_type == "GPT2BPETokenizer":
            return f"GPT2BPETokenizer({self.vocab_file}, {self.merge_file})"
        return self.tokenizer_model or "?"


TOKENIZER_ARG_HELP = {
    "tokenizer_type": "Megatron-LM's tokenizer kind: " + ", ".join(TOKENIZER_TYPES)
                      + " (default: read off --tokenizer-model).",
    "tokenizer_model": "Our tokenizer folder (tools/train_tokenizer.py), a sentencepiece .model, or a Hugging Face "
                       "tokenizer folder (tokenizer.json, or anything AutoTokenizer loads).",
    "vocab_file": "GPT2BPETokenizer: the vocab.json.",
    "merge_file": "GPT2BPETokenizer: the merges.txt.",
}


def add_tokenizer_args(parser: Any) -> Any:
    """The tokenizer flags, the same in every tool (training generates its own from TokenizerSpec's fields)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES, help=TOKENIZER_ARG_HELP["tokenizer_type"])
    group.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer_model", default=None,
                       help=TOKENIZER_ARG_HELP["tokenizer_model"])
    group.add_argument("--vocab-file", default=None, help=TOKENIZER_ARG_HELP["vocab_file"])
    group.add_argument("--merge-file", default=None, help=TOKENIZER_ARG_HELP["merge_file"])
    return group


def describe_added_chat_tokens(tokenizer: "LimeTokenizer") -> str | None:
    """The log line for chat tags with_chat_tokens() added, or None when the tokenizer had them all."""
    if not tokenizer.added_chat_tokens:
        return None
    n = len(tokenizer.added_chat_tokens)
    ids = [tokenizer.vocab_size - n + i for i in range(n)]
    return (f"tokenizer {tokenizer.path} lacks {', '.join(tokenizer.added_chat_tokens)}: added as new special ids "
            f"{', '.join(map(str, ids))} (vocabulary {tokenizer.vocab_size - n} -> {tokenizer.vocab_size}); SFT "
            "training and the Hugging Face export add the same ids")


def build_tokenizer(spec: TokenizerSpec, chat_tokens: bool = False, check: bool = True) -> "LimeTokenizer":
    """The tokenizer a spec names, checked to go all the way to a Hugging Face export.

    This is what tools call first: a tokenizer that cannot be supported is refused here, with
    the reason, before any data is written. chat_tokens=True adds <user>/<assistant>/<context>
    as new ids when the tokenizer lacks them (SFT, export): see LimeTokenizer.with_chat_tokens.
    check=False skips the export check (worker processes of a tool that already checked).
    """
    kind = spec.tokenizer_type
    if kind is not None and kind not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {kind}: not one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "GPT2BPETokenizer":
        if not spec.vocab_file or not spec.merge_file:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)")
        tokenizer: LimeTokenizer = HuggingFaceTokenizer.from_gpt2_files(spec.vocab_file, spec.merge_file)
    else:
        if not spec.tokenizer_model:
            raise ValueError("--tokenizer-model is required (our tokenizer folder, a sentencepiece .model or a "
                             "Hugging Face tokenizer folder)")
        tokenizer = load_tokenizer(spec.tokenizer_model)
        is_sentencepiece = os.path.isfile(spec.tokenizer_model) and not spec.tokenizer_model.endswith(".json") or \
            os.path.isfile(os.path.join(spec.tokenizer_model, SENTENCEPIECE_FILE))
        if kind in SENTENCEPIECE_TYPES and not is_sentencepiece:
            raise ValueError(f"--tokenizer-type {kind}: {spec.tokenizer_model} is not a sentencepiece model "
                             "(use --tokenizer-type HuggingFaceTokenizer)")
    if check:
        tokenizer.check_exportable()
    return tokenizer.with_chat_tokens() if chat_tokens else tokenizer


class LimeTokenizer:
    """A tokenizer with the ids the rest of megatron-lime needs.

    Attributes:
        vocab_size: number of ids (rows the embedding needs).
        eos_id, pad_id: always set (pad falls back to eos for foreign tokenizers without one).
        user_id, assistant_id, context_id: the SFT tags' ids, or None if the tokenizer lacks them.
        added_chat_tokens: the tags with_chat_tokens() added as new ids (empty when it had them all).
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
    added_chat_tokens: tuple[str, ...] = ()

    def encode(self, text: str) -> list[int]:
        """Ids of raw text: no special tokens added, special strings in the text stay plain text."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def hf_backend(self) -> Any:
        """This tokenizer as a `tokenizers.Tokenizer` giving the same ids (what the export saves)."""
        raise NotImplementedError

    def with_chat_tokens(self) -> "LimeTokenizer":
        """This tokenizer with <user>, <assistant>, <context> as special ids, added after the last id
        (in that order) when missing. Deterministic, so preprocessing, SFT and export agree; text
        never encodes to them."""
        raise NotImplementedError

    def check_exportable(self) -> None:
        """Raise ValueError, with the reason, if the Hugging Face export would not give the same ids."""
        backend = self.hf_backend()
        backend.encode_special_tokens = True
        got = backend.encode(CONVERSION_PROBE, add_special_tokens=False).ids
        if got != self.encode(CONVERSION_PROBE):
            raise ValueError(f"tokenizer {self.path}: its Hugging Face form (tokenizers library) encodes text "
                             "differently from the tokenizer itself, so an exported model would not see the ids it "
                             "was trained on; not supported (use a BPE or unigram sentencepiece model, a "
                             "tokenizer.json, or tools/train_tokenizer.py)")

    def save_hf(self, output_dir: str) -> None:
        """Write files that `AutoTokenizer.from_pretrained(output_dir)` loads offline, giving the same ids."""
        write_hf_tokenizer_files(self, output_dir)

    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "eos": self.eos_id, "user": self.user_id,
                "assistant": self.assistant_id, "context": self.context_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class SentencePieceTokenizer(LimeTokenizer):
    """Our lossless sentencepiece model (tokenizer.model in our directory), encoded by sentencepiece.

    Any other sentencepiece model (a LLaMA-style one with whitespace escaping and a dummy prefix,
    a unigram model with NFKC normalisation, ...) is loaded as a HuggingFaceTokenizer converted
    from it (load_sentencepiece): then preprocessing, training and the export all use one
    `tokenizers` form, so the exported tokenizer gives exactly the ids the data holds. (Encoded by
    sentencepiece itself, a unigram model can differ from its conversion where two segmentations
    score the same, so the export could not promise that.)"""

    def __init__(self, model_file: str | None = None, path: str | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        if model_proto is None:
            with open(model_file, "rb") as f:
                model_proto = f.read()
        self.model_file = model_file
        self.model_proto = model_proto
        self.path = path or model_file or "?"
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.get_piece_size()

        eos = self.processor.eos_id()
        if eos < 0:
            eos = self._piece_id(SPECIAL_TOKENS.eos) if self._piece_id(SPECIAL_TOKENS.eos) is not None else self._piece_id("</s>")
        if eos is None or eos < 0:
            raise ValueError(f"{self.path}: the sentencepiece model has no end-of-sequence piece (eos_id is -1)")
        self.eos_id = eos
        pad = self.processor.pad_id()
        self.pad_id = pad if pad >= 0 else eos
        unk = self.processor.unk_id()
        self.unk_id = unk if unk >= 0 else None
        self.user_id = self._piece_id(SPECIAL_TOKENS.user)
        self.assistant_id = self._piece_id(SPECIAL_TOKENS.assistant)
        self.context_id = self._piece_id(SPECIAL_TOKENS.context)

    def _piece_id(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for unknown pieces; only a real match counts.
        i = self.processor.piece_to_id(piece)
        return i if self.processor.id_to_piece(i) == piece else None

    def proto(self) -> Any:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        return proto

    @property
    def lossless(self) -> bool:
        """Ours (tools/train_tokenizer.py): BPE, identity normalisation, no whitespace escaping, no dummy prefix."""
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = self.proto()
        spec = proto.normalizer_spec
        return (proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE and spec.name == "identity"
                and not spec.escape_whitespaces and not spec.add_dummy_prefix)

    def encode(self, text: str) -> list[int]:
        # Special tokens are sentencepiece control symbols, which encode() never produces
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

    def with_chat_tokens(self) -> "SentencePieceTokenizer":
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        missing = [t for t in CHAT_TOKENS if self._piece_id(t) is None]
        if not missing:
            return self
        # Control pieces appended at the end: new ids, and sentencepiece never produces them from text.
        proto = self.proto()
        for token in missing:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = token, 0.0, sp_pb2.ModelProto.SentencePiece.CONTROL
        extended = SentencePieceTokenizer(self.model_file, path=self.path, model_proto=proto.SerializeToString())
        extended.added_chat_tokens = tuple(missing)
        return extended

    def hf_backend(self) -> Any:
        return lossless_sentencepiece_backend(self.proto())


class HuggingFaceTokenizer(LimeTokenizer):
    """A `tokenizers.Tokenizer` with its special tokens: a Hugging Face folder or GPT-2's vocab + merges."""

    def __init__(self, backend: Any, path: str, eos_token: str | None, pad_token: str | None = None,
                 unk_token: str | None = None, tokenizer_class: str | None = None):
        self.path = path
        self.backend = backend
        # Raw text must never produce special ids (see the module docstring).
        self.backend.encode_special_tokens = True
        self.tokenizer_class = tokenizer_class

        def token_id(token: str | None) -> int | None:
            return None if token is None else self.backend.token_to_id(token)

        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        eos = token_id(eos_token)
        if eos is None:
            eos = token_id(SPECIAL_TOKENS.eos)
        if eos is None:
            raise ValueError(f"{path}: the tokenizer has no eos_token (set it in tokenizer_config.json)")
        self.eos_id = eos
        pad = token_id(pad_token)
        self.pad_id = pad if pad is not None else eos
        self.unk_id = token_id(unk_token)
        self.user_id = token_id(SPECIAL_TOKENS.user)
        self.assistant_id = token_id(SPECIAL_TOKENS.assistant)
        self.context_id = token_id(SPECIAL_TOKENS.context)

    @classmethod
    def from_directory(cls, directory: str) -> "HuggingFaceTokenizer":
        """tokenizer.json read directly; any other folder through AutoTokenizer (fast tokenizers only)."""
        from tokenizers import Tokenizer

        config = _read_json(os.path.join(directory, "tokenizer_config.json"), default={})
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"), default={})

        def token_string(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            if isinstance(value, dict):  # older files store {"content": "<eos>", ...}
                value = value.get("content")
            return value

        tokenizer_json = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(tokenizer_json):
            return cls(Tokenizer.from_file(tokenizer_json), directory, token_string("eos_token"),
                       token_string("pad_token"), token_string("unk_token"), config.get("tokenizer_class"))
        try:
            from transformers import AutoTokenizer

            loaded = AutoTokenizer.from_pretrained(directory)
        except Exception as err:  # transformers raises many kinds; the message is what the user needs
            raise FileNotFoundError(f"{directory}: not a tokenizer we can load: no {SENTENCEPIECE_FILE}, no "
                                    f"tokenizer.json, and AutoTokenizer failed: {err}") from None
        backend = getattr(loaded, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{directory}: AutoTokenizer gives a slow (Python) tokenizer, {type(loaded).__name__}; "
                             "only tokenizers with a fast (tokenizers library) form are supported: save it with "
                             "a fast tokenizer (tokenizer.json)")
        return cls(Tokenizer.from_str(backend.to_str()), directory, loaded.eos_token, loaded.pad_token,
                   loaded.unk_token, type(loaded).__name__)

    @classmethod
    def from_sentencepiece(cls, tokenizer: SentencePieceTokenizer) -> "HuggingFaceTokenizer":
        """A sentencepiece model converted by transformers (converted_sentencepiece_backend)."""
        processor = tokenizer.processor
        return cls(converted_sentencepiece_backend(tokenizer.proto(), tokenizer.path), tokenizer.path,
                   tokenizer.id_to_piece(tokenizer.eos_id),
                   processor.id_to_piece(processor.pad_id()) if processor.pad_id() >= 0 else None,
                   processor.id_to_piece(processor.unk_id()) if processor.unk_id() >= 0 else None)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str, merge_file: str) -> "HuggingFaceTokenizer":
        """GPT-2's byte-level BPE from vocab.json + merges.txt (Megatron-LM's GPT2BPETokenizer); eos <|endoftext|>."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for name, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} {path}: no such file")
        backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>"
        if backend.token_to_id(eos) is None:
            raise ValueError(f"--vocab-file {vocab_file}: no {eos} entry, which GPT2BPETokenizer uses as its eos")
        backend.add_special_tokens([eos])
        return cls(backend, os.path.dirname(os.path.abspath(vocab_file)), eos, tokenizer_class="GPT2TokenizerFast")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self.backend.id_to_token(int(token_id))

    def with_chat_tokens(self) -> "HuggingFaceTokenizer":
        from tokenizers import AddedToken, Tokenizer

        missing = [t for t in CHAT_TOKENS if self.backend.token_to_id(t) is None]
        if not missing:
            return self
        backend = Tokenizer.from_str(self.backend.to_str())
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        extended = HuggingFaceTokenizer(backend, self.path, self.id_to_piece(self.eos_id), self.id_to_piece(self.pad_id),
                                        None if self.unk_id is None else self.id_to_piece(self.unk_id),
                                        self.tokenizer_class)
        extended.added_chat_tokens = tuple(missing)
        return extended

    def hf_backend(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend.to_str())


def load_tokenizer(path: str) -> LimeTokenizer:
    """Load our tokenizer directory, a sentencepiece `.model` file, a Hugging Face tokenizer directory,
    or a directory with GPT-2's vocab.json + merges.txt.

    Tools call build_tokenizer (the flags, plus the export check); this is the plain loader.
    """
    if os.path.isfile(path):
        if path.endswith(".json"):
            return HuggingFaceTokenizer.from_directory(os.path.dirname(os.path.abspath(path)))
        return load_sentencepiece(path, path)
    if os.path.isdir(path):
        model_file = os.path.join(path, SENTENCEPIECE_FILE)
        if os.path.isfile(model_file):
            return load_sentencepiece(model_file, path)
        gpt2_files = [os.path.join(path, name) for name in GPT2_FILES]
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and all(map(os.path.isfile, gpt2_files)):
            return HuggingFaceTokenizer.from_gpt2_files(*gpt2_files)
        return HuggingFaceTokenizer.from_directory(path)
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a directory or a sentencepiece .model file)")


def load_sentencepiece(model_file: str, path: str) -> LimeTokenizer:
    """Ours as it is; any other sentencepiece model in its converted form (see SentencePieceTokenizer)."""
    tokenizer = SentencePieceTokenizer(model_file, path=path)
    return tokenizer if tokenizer.lossless else HuggingFaceTokenizer.from_sentencepiece(tokenizer)


# ---------------------------------------------------------------------------------------
# Hugging Face export.


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
        raise ValueError("only sentencepiece BPE models without whitespace escaping can be exported this way")
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
        raise ValueError(f"tokenizer {path}: converting a sentencepiece model with whitespace escaping or a dummy "
                         "prefix needs transformers >= 5 (SpmConverter.build_tokenizer_from_spm_proto)") from None
    model_type = proto.trainer_spec.model_type
    if model_type == sp_pb2.TrainerSpec.BPE:
        vocab: Any = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif model_type == sp_pb2.TrainerSpec.UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        kind = sp_pb2.TrainerSpec.ModelType.Name(model_type)
        raise ValueError(f"tokenizer {path}: a sentencepiece {kind} model has no Hugging Face equivalent; "
                         "only BPE and unigram models are supported")
    # legacy=True: the dummy prefix before every text piece between special tokens, as the SFT
    # template encodes each piece on its own with sentencepiece.
    backend = build(proto, vocab, legacy=True)
    if backend is None:
        raise ValueError(f"tokenizer {path}: transformers could not convert this sentencepiece model")
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _special_pieces(proto)])
    return backend


def write_hf_tokenizer_files(tokenizer: LimeTokenizer, output_dir: str) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for any LimeTokenizer.

    The result loads with `AutoTokenizer.from_pretrained(output_dir)` offline (no remote code)
    as a fast tokenizer that gives the same ids as the tokenizer on raw text, and maps the
    special strings (its eos, the chat tags) to their single ids.
    """
    from megatron_lime.files import write_json, write_text

    backend = tokenizer.hf_backend()
    # The exported tokenizer is for prompts, where "<user>" must map to its id.
    backend.encode_special_tokens = False
    os.makedirs(output_dir, exist_ok=True)
    write_text(os.path.join(output_dir, "tokenizer.json"), backend.to_str(pretty=True))
    piece = tokenizer.id_to_piece
    tokens = {
        "eos_token": piece(tokenizer.eos_id),
        "pad_token": piece(tokenizer.pad_id),
        "unk_token": None if tokenizer.unk_id is None else piece(tokenizer.unk_id),
    }
    tokens = {k: v for k, v in tokens.items() if v is not None}
    extra = [piece(i) for i in (tokenizer.user_id, tokenizer.assistant_id, tokenizer.context_id) if i is not None]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "additional_special_tokens": extra,
        "model_max_length": MODEL_MAX_LENGTH,
        # Decoding must give the text back exactly: no " ." -> "." clean-up.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
    }
    write_json(os.path.join(output_dir, "tokenizer_config.json"), config)
    write_json(os.path.join(output_dir, "special_tokens_map.json"), {**tokens, "additional_special_tokens": extra})


def _read_json(path: str, default: dict) -> dict:
    if not os.path.isfile(path):
        return default
    from megatron_lime.files import read_json

    return read_json(path)


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
    with open(os.path.join(output_dir, "tokenizer_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return output_dir
