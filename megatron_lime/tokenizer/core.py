"""The tokenizer classes and their loading: LimeTokenizer (what the rest of megatron-lime uses), the
sentencepiece and Hugging Face kinds, load_tokenizer (plain loader) and build_tokenizer (what tools call:
the flags, plus the check that the Hugging Face export gives the same ids). See the package docstring."""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Iterable, Sequence

from megatron_lime.errors import LimeInputError, MissingInputError
from megatron_lime.files import read_json, write_json, write_text
from megatron_lime.tokenizer.agreement import encode_by_words, lossless_router
from megatron_lime.tokenizer.conversion_cache import converted_form
from megatron_lime.tokenizer.huggingface import lossless_sentencepiece_backend
from megatron_lime.tokenizer.spec import CHAT_TOKENS, GPT2_FILES, SENTENCEPIECE_FILE, SENTENCEPIECE_TYPES, \
    MODEL_MAX_LENGTH, SPECIAL_TOKENS, TOKENIZER_TYPES, TokenizerSpec

# Text a sentencepiece model's Hugging Face conversion must encode exactly as sentencepiece does
# before any tool accepts the model: whitespace runs, leading/trailing spaces, newlines and tabs,
# digits, punctuation, accents, CJK, emoji, a character outside any small vocabulary.
CONVERSION_PROBE = ("  Hello,  world!\n\tThe year 2025: naïve café, \u00bd cup.  \n\n"
                    "  x  \u4e2d\u6587 \U0001F600 \u2581meta <b>tag</b> end  ")


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
        raise LimeInputError(f"--tokenizer-type {kind}: not one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "GPT2BPETokenizer":
        if not spec.vocab_file or not spec.merge_file:
            raise LimeInputError("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and "
                                 "--merge-file (merges.txt)")
        tokenizer: LimeTokenizer = HuggingFaceTokenizer.from_gpt2_files(spec.vocab_file, spec.merge_file)
    else:
        if not spec.tokenizer_model:
            raise LimeInputError("--tokenizer-model is required (our tokenizer folder, a sentencepiece .model or a "
                                 "Hugging Face tokenizer folder)")
        tokenizer = load_tokenizer(spec.tokenizer_model)
        is_sentencepiece = os.path.isfile(spec.tokenizer_model) and not spec.tokenizer_model.endswith(".json") or \
            os.path.isfile(os.path.join(spec.tokenizer_model, SENTENCEPIECE_FILE))
        if kind in SENTENCEPIECE_TYPES and not is_sentencepiece:
            raise LimeInputError(f"--tokenizer-type {kind}: {spec.tokenizer_model} is not a sentencepiece model "
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
            raise LimeInputError(f"tokenizer {self.path}: its Hugging Face form (tokenizers library) encodes text "
                                 "differently from the tokenizer itself, so an exported model would not see the ids it "
                                 "was trained on; not supported (use a BPE or unigram sentencepiece model, a "
                                 "tokenizer.json, or tools/train_tokenizer.py)")

    def save_hf(self, output_dir: str) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json: files that
        `AutoTokenizer.from_pretrained(output_dir)` loads offline (no remote code) as a fast tokenizer giving the
        same ids as this tokenizer on raw text, and mapping the special strings (its eos, the chat tags) to their
        single ids."""
        backend = self.hf_backend()
        # The exported tokenizer is for prompts, where "<user>" must map to its id.
        backend.encode_special_tokens = False
        os.makedirs(output_dir, exist_ok=True)
        write_text(os.path.join(output_dir, "tokenizer.json"), backend.to_str(pretty=True))
        piece = self.id_to_piece
        tokens = {
            "eos_token": piece(self.eos_id),
            "pad_token": piece(self.pad_id),
            "unk_token": None if self.unk_id is None else piece(self.unk_id),
        }
        tokens = {k: v for k, v in tokens.items() if v is not None}
        extra = [piece(i) for i in (self.user_id, self.assistant_id, self.context_id) if i is not None]
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

    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "eos": self.eos_id, "user": self.user_id,
                "assistant": self.assistant_id, "context": self.context_id}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class SentencePieceTokenizer(LimeTokenizer):
    """Our lossless sentencepiece model (tokenizer.model in our directory), encoded by sentencepiece, word by word
    in encode_batch (each distinct word once; the same ids: agreement.lossless_router).

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
            eos = self._piece_id(SPECIAL_TOKENS.eos)
            if eos is None:
                eos = self._piece_id("</s>")
        if eos is None or eos < 0:
            raise LimeInputError(f"{self.path}: the sentencepiece model has no end-of-sequence piece (eos_id is -1)")
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
        # Threads stay at 1 because preprocessing already runs one worker process per core.
        texts = list(texts)
        if self.router is None:
            return self.processor.encode(texts, num_threads=1)
        # Our lossless model: a text's ids are its words' ids put together (agreement.lossless_router), so each
        # distinct word is encoded once by sentencepiece and kept.
        def learn(words: list[str], doubtful: list[bool]) -> None:
            self.router.learn(words, self.processor.encode(words, num_threads=1), [True] * len(words))

        return encode_by_words(self.router, texts, learn, lambda rest: self.processor.encode(rest, num_threads=1))[0]

    @functools.cached_property
    def router(self) -> Any:
        """The word cache of our lossless models (None for any other model): built when first encoding."""
        return lossless_router(self.proto()) if self.lossless else None

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "router"}  # compiled; rebuilt when first used

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
            raise LimeInputError(f"{path}: the tokenizer has no eos_token (set it in tokenizer_config.json)")
        self.eos_id = eos
        pad = token_id(pad_token)
        self.pad_id = pad if pad is not None else eos
        self.unk_id = token_id(unk_token)
        self.user_id = token_id(SPECIAL_TOKENS.user)
        self.assistant_id = token_id(SPECIAL_TOKENS.assistant)
        self.context_id = token_id(SPECIAL_TOKENS.context)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # A pickled tokenizers.Tokenizer comes back with encode_special_tokens off: raw text would then
        # turn "<eos>" into the special id in a spawned worker.
        self.backend.encode_special_tokens = True

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
            raise MissingInputError(f"{directory}: not a tokenizer we can load: no {SENTENCEPIECE_FILE}, no "
                                    f"tokenizer.json, and AutoTokenizer failed: {err}") from None
        backend = getattr(loaded, "backend_tokenizer", None)
        if backend is None:
            raise LimeInputError(f"{directory}: AutoTokenizer gives a slow (Python) tokenizer, "
                                 f"{type(loaded).__name__}; only tokenizers with a fast (tokenizers library) form are "
                                 "supported: save it with a fast tokenizer (tokenizer.json)")
        return cls(Tokenizer.from_str(backend.to_str()), directory, loaded.eos_token, loaded.pad_token,
                   loaded.unk_token, type(loaded).__name__)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str, merge_file: str) -> "HuggingFaceTokenizer":
        """GPT-2's byte-level BPE from vocab.json + merges.txt (Megatron-LM's GPT2BPETokenizer); eos <|endoftext|>."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for name, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(path):
                raise MissingInputError(f"{name} {path}: no such file")
        backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>"
        if backend.token_to_id(eos) is None:
            raise LimeInputError(f"--vocab-file {vocab_file}: no {eos} entry, which GPT2BPETokenizer uses as its eos")
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
        extended = HuggingFaceTokenizer(backend, self.path, self.id_to_piece(self.eos_id),
                                        self.id_to_piece(self.pad_id),
                                        None if self.unk_id is None else self.id_to_piece(self.unk_id),
                                        self.tokenizer_class)
        extended.added_chat_tokens = tuple(missing)
        return extended

    def hf_backend(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend.to_str())


class ConvertedSentencePieceTokenizer(HuggingFaceTokenizer):
    """Any sentencepiece model other than ours, in the form transformers converts it to (what the export saves
    and what the data must hold), encoded by sentencepiece itself wherever the two provably give the same
    ids (agreement.py: the model decides once whether they can, each text's characters whether its
    normalisation agrees, and each of its words, checked once with both encoders, whether BPE agrees) and
    by the conversion elsewhere. The conversion's ids for every text; on most, faster than sentencepiece on the
    whole text, since each distinct word is encoded once (encode_routed)."""

    def __init__(self, source: SentencePieceTokenizer):
        processor = source.processor
        backend, self.agreement = converted_form(source.proto(), source.model_proto, source.path)
        super().__init__(backend, source.path,
                         source.id_to_piece(source.eos_id),
                         processor.id_to_piece(processor.pad_id()) if processor.pad_id() >= 0 else None,
                         processor.id_to_piece(processor.unk_id()) if processor.unk_id() >= 0 else None)
        self.processor = processor
        self.router = self.agreement.router() if self.agreement.usable else None

    def __getstate__(self) -> dict:
        return {**vars(self), "router": None}  # the compiled router is rebuilt (its words are a cache)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.router = self.agreement.router() if self.agreement.usable else None

    def describe_encoder(self) -> str:
        if self.agreement.usable:
            return (f"tokenizer {self.path}: sentencepiece encodes the texts on which it provably gives the ids "
                    f"of the Hugging Face conversion (none of {len(self.agreement.unsafe)} characters, every word "
                    "checked; word by word, each distinct word encoded once), the conversion the others")
        return f"tokenizer {self.path}: its Hugging Face conversion encodes every text ({self.agreement.reason})"

    def encode_by_sentencepiece(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=1)

    def encode_by_conversion(self, texts: Sequence[str]) -> list[list[int]]:
        return HuggingFaceTokenizer.encode_batch(self, texts)

    def encode_routed(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """(the ids of each text, whether sentencepiece gave them). Where sentencepiece provably agrees with the
        conversion (covered characters, every word verified: agreement.py), the ids are sentencepiece's ids of
        the text's words put together, each distinct word encoded once and kept (router()); the conversion
        encodes the other texts."""
        texts = list(texts)
        if self.router is None:
            return self.encode_by_conversion(texts), [False] * len(texts)
        ids, status = encode_by_words(self.router, texts, self.learn_words, self.encode_by_conversion)
        return ids, [s == 0 for s in status]

    def learn_words(self, words: list[str], doubtful: list[bool]) -> None:
        """Encode new words with sentencepiece; a doubtful one (agreement.py) also with the conversion, and it
        agrees only if both give the same ids."""
        ids = self.encode_by_sentencepiece(words)
        agree = [True] * len(words)
        checked = [k for k, d in enumerate(doubtful) if d]
        for k, converted in zip(checked, self.encode_by_conversion([words[k] for k in checked])):
            agree[k] = ids[k] == converted
        self.router.learn(words, ids, agree)

    def by_sentencepiece(self, texts: Sequence[str]) -> list[bool]:
        """Which texts sentencepiece encodes (covered characters and every word verified: agreement.py)."""
        return self.encode_routed(texts)[1]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encode_routed(texts)[0]

    def with_chat_tokens(self) -> "ConvertedSentencePieceTokenizer":
        extended = super().with_chat_tokens()
        if extended is self:
            return self
        # The tags are new special ids after the last one: sentencepiece never produces them either.
        routed = copy.copy(self)
        routed.__dict__.update(vars(extended))
        return routed


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
    raise MissingInputError(f"tokenizer not found: {path} (expected a directory or a sentencepiece .model file)")


def load_sentencepiece(model_file: str, path: str) -> LimeTokenizer:
    """Ours as it is; any other sentencepiece model in its converted form (see SentencePieceTokenizer)."""
    tokenizer = SentencePieceTokenizer(model_file, path=path)
    return tokenizer if tokenizer.lossless else ConvertedSentencePieceTokenizer(tokenizer)


def _read_json(path: str, default: dict) -> dict:
    return read_json(path) if os.path.isfile(path) else default
