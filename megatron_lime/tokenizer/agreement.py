"""When sentencepiece's own encoder gives exactly the ids of a model's tokenizers-library conversion.

A sentencepiece model that is not ours (a standard BPE model: nmt_nfkc normalisation, dummy prefix,
whitespace escaping and collapsing, byte fallback) is exported in the form transformers' converter
gives it (huggingface.converted_sentencepiece_backend), and the data must hold exactly that form's
ids. Where the two provably agree, a text's ids are sentencepiece's ids of its words put together, so
preprocessing encodes those texts word by word, each distinct word once (several times sentencepiece's
speed on whole texts: benchmarks/bench_preprocess.py), and the conversion encodes the rest.
`sentencepiece_agreement(proto)` works out, once when the model is loaded, whether and for which texts
that holds:

Both encoders run three stages; each must agree.

1. The normaliser. Sentencepiece replaces, left to right, the longest key of the precompiled
   charsmap that starts at the current position. The tokenizers library (`Precompiled`) goes by
   grapheme cluster: a cluster under 6 bytes is replaced whole by the value of the *shortest* key
   that is a prefix of it; otherwise, and when none is, each character by its own key. The two
   differ (a key that is a prefix of a longer cluster, multi-character keys across clusters), so
   we take the texts on which both are the identity except for single characters that form a
   cluster of their own. A text is covered when none of its characters is
     * a non-first character of a multi-character key (then no multi-character key can match
       anywhere, in either encoder), or
     * a single-character key other than a control character (Unicode category Cc, not CR) that
       the charsmap turns into one space: controls always form their own grapheme cluster
       (UAX #29, GB4/GB5; only CR LF joins), so both encoders replace exactly that character by a
       space, and nothing else (nmt_nfkc: tab, newline, form feed; the controls it deletes are
       left out, so that words stay where the text shows them), or
     * U+2581 (the whitespace meta symbol: sentencepiece strips a trailing literal one as if it
       were an escaped space; the conversion does not).
   On a covered text both normalisers only turn some control characters into spaces.
2. Whitespace. Sentencepiece with remove_extra_whitespaces, add_dummy_prefix and
   escape_whitespaces strips leading and trailing spaces (U+0020 only), collapses runs of them,
   returns nothing if nothing is left, else prepends one and writes spaces as U+2581. The converter
   builds the same steps (Replace `\\A +| +\\z`, Replace ` {2,}`, Replace ` ` -> U+2581, Metaspace
   prepend). We require exactly these three settings and no treat_whitespace_as_suffix; any other
   combination is left to the conversion.
3. BPE, one word at a time. Both start from one symbol per character and merge adjacent pairs whose
   concatenation is a piece, best first: sentencepiece by piece score, the leftmost on a tie; the
   converted BPE by merge rank (piece score, then the split's strings), the leftmost on a tie.
   They can order merges that form the same piece differently (e.g. '000000' from ('0000', '00')
   or ('00', '0000'), pending in overlapping places), so we do not argue that the procedures are
   equal: we check their results. When no piece holds U+2581 after its first character (true of
   models trained with split_by_whitespace, sentencepiece's default; checked), no merge can join
   two words (a word: U+2581 and the characters up to the next U+2581), so each encoder's result
   for a text is its results for the text's words put together, each word encoded on its own.
   A new word is known to agree without encoding when no piece with two or more splits occurs
   twice in it (`bpe_shortcut` says why); any other new word is encoded with both encoders once.
   The words are kept with their verdicts and sentencepiece's ids (`router()`: C++,
   megatron_lime._data_helpers.WordRouter, bounded memory); a text is encoded this way only when
   every one of its words is known to agree, and its ids are then its words' ids put together (so
   each distinct word is encoded once, not each text: faster than sentencepiece on whole texts).
   A model whose normal pieces hold U+2581 after
   the start, or with user-defined pieces (the converter then splits them off and skips merges),
   or a unigram model (not BPE: left to the conversion, as its ties are broken differently), is
   encoded by the conversion throughout. Unknown characters (byte fallback or <unk>) are part of
   the words checked.

Our own lossless models (tools/train_tokenizer.py: identity normalisation, no dummy prefix, spaces kept as
they are) are encoded by sentencepiece itself, and need none of this; but the same way of encoding applies.
No merge can put a space after another character when no piece holds one (true of models trained with
split_by_whitespace; checked by `word_split_obstacle`), so a text's ids are the ids of its words put
together, a word being here a run of spaces and the run of other characters after it, each encoded on its
own. `lossless_router(proto)` keeps those words' ids (the same compiled WordRouter, leading_spaces=True).

tests/test_tokenizer.py checks agreement on adversarial text (unicode, whitespace runs, byte
fallback, digits, empty) and that a model breaking a condition is encoded by the conversion.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from megatron_lime.native import compiled_helpers

META = "\u2581"  # sentencepiece's whitespace symbol


@dataclass(frozen=True)
class SentencePieceAgreement:
    """For which texts sentencepiece may stand in for the conversion: `covers(text)`, then every word verified.

    covers() and words() are the reference of the compiled router() that encoding uses (tests compare them)."""

    reason: str | None  # why sentencepiece is never used for this model; None when it is, for covered texts
    unsafe: frozenset[str] = frozenset()  # a text holding any of these characters goes to the conversion
    spaces: str = " "  # the characters the normaliser turns into a space: they separate words
    prove: bool = False  # a word without a repeated multi-split piece agrees without being encoded (BPE, 3.)
    multi_split: frozenset[str] = frozenset()  # normal pieces with two or more splits into normal pieces
    _ascii_unsafe: tuple[str, ...] = field(default=(), repr=False)
    _unsafe_pattern: Any = field(default=None, repr=False)
    _word_pattern: Any = field(default=None, repr=False)
    _ascii_split: bool = field(default=False, repr=False)

    @classmethod
    def usable_for(cls, rules: dict[str, str], prove: bool = False,
                   multi_split: frozenset[str] = frozenset()) -> "SentencePieceAgreement":
        unsafe = unsafe_characters(rules)
        spaces = " " + "".join(sorted(k for k, v in rules.items() if len(k) == 1 and v == " " and k not in unsafe))
        return cls.of(unsafe, spaces, prove, multi_split)

    @classmethod
    def of(cls, unsafe: Iterable[str], spaces: str, prove: bool,
           multi_split: Iterable[str]) -> "SentencePieceAgreement":
        """A usable agreement from its sets (usable_for derives them from the charsmap's rules)."""
        unsafe, multi_split = frozenset(unsafe), frozenset(multi_split)
        ranges = _char_class(sorted(unsafe))
        # str.split() cuts at ASCII whitespace: exact for covered ASCII text when each of those is a space here
        # or never in a covered text.
        ascii_split = all(c in spaces or c in unsafe for c in " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")
        return cls(None, unsafe, spaces, prove, multi_split,
                   tuple(sorted(c for c in unsafe if c.isascii())),
                   re.compile(f"[{ranges}]") if ranges else None,
                   re.compile(f"[^{_char_class(sorted(spaces))}]+"), ascii_split)

    @property
    def usable(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict:
        """What `from_json` rebuilds it from (tokenizer/conversion_cache.py keeps it)."""
        if self.reason is not None:
            return {"reason": self.reason}
        return {"unsafe": "".join(sorted(self.unsafe)), "spaces": self.spaces, "prove": self.prove,
                "multi_split": sorted(self.multi_split)}

    @classmethod
    def from_json(cls, payload: dict) -> "SentencePieceAgreement":
        if "reason" in payload:
            return cls(payload["reason"])
        return cls.of(payload["unsafe"], payload["spaces"], payload["prove"], payload["multi_split"])

    def covers(self, text: str) -> bool:
        """True when both normalisers provably give the same string for `text` (see the module docstring)."""
        if self.reason is not None:
            return False
        if text.isascii():
            return not any(c in text for c in self._ascii_unsafe)
        return self._unsafe_pattern is None or self._unsafe_pattern.search(text) is None

    def words(self, text: str) -> set[str]:
        """The words of a covered text: what lies between the characters the normaliser makes spaces."""
        if self._ascii_split and text.isascii():
            return set(text.split())
        return set(self._word_pattern.findall(text))

    def doubtful(self, word: str) -> bool:
        """True when a word must be encoded by both to know they agree: some piece with two or more splits
        occurs at two places in U+2581 + word (always True without the shortcut)."""
        if not self.prove:
            return True
        w, longest, seen = META + word, max(map(len, self.multi_split), default=0), set()
        for i in range(len(w)):
            for j in range(i + 3, min(len(w), i + longest) + 1):
                if w[i:j] in self.multi_split:
                    if w[i:j] in seen:
                        return True
                    seen.add(w[i:j])
        return False

    def router(self, limit: int = 1_000_000) -> Any:
        """The compiled form of covers() and words(), keeping each word's verdict and sentencepiece's ids (at most
        about `limit` agreeing words, some 60 bytes each; past that they are forgotten and encoded again when
        met)."""
        return compiled_helpers().WordRouter(sorted(map(ord, self.unsafe)), sorted(map(ord, self.spaces)), limit,
                                             self.prove, sorted(self.multi_split))


def _char_class(chars: list[str]) -> str:
    """A regex character class body for sorted characters, as ranges."""
    parts, i = [], 0
    while i < len(chars):
        j = i
        while j + 1 < len(chars) and ord(chars[j + 1]) == ord(chars[j]) + 1:
            j += 1
        first, last = re.escape(chars[i]), re.escape(chars[j])
        parts.append(first if i == j else f"{first}-{last}")
        i = j + 1
    return "".join(parts)


def charsmap_rules(charsmap: bytes) -> dict[str, str]:
    """Every key -> value of a sentencepiece precompiled charsmap (C++: a walk of its double-array trie)."""
    return compiled_helpers().charsmap_rules(charsmap)


def unsafe_characters(rules: dict[str, str]) -> set[str]:
    """The characters that keep a text off sentencepiece (normaliser part of the module docstring)."""
    unsafe = {META}
    for key, value in rules.items():
        if len(key) > 1:
            unsafe.update(key[1:])
        elif key == "\r" or unicodedata.category(key) != "Cc" or value != " ":
            unsafe.add(key)
    return unsafe


def bpe_obstacle(proto: Any) -> str | None:
    """Why a text's encoding is not its words' encodings put together (BPE part of the docstring), or None."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    kind = sp_pb2.ModelProto.SentencePiece
    for i, p in enumerate(proto.pieces):
        if p.type in (kind.USER_DEFINED, kind.UNUSED):
            return f"piece {i} {p.piece!r} is {kind.Type.Name(p.type).lower().replace('_', '-')}"
        if p.type == kind.NORMAL and META in p.piece[1:]:
            return f"piece {i} {p.piece!r} holds the whitespace symbol after its start (merges across words)"
    return None


def bpe_shortcut(proto: Any) -> tuple[bool, frozenset[str]]:
    """(whether a word's agreement follows from its pieces, the normal pieces with two or more splits).

    With pairwise different normal scores, one-character pieces all normal, and every character of a
    piece a piece itself, the two encoders consider the same pairs and rank different pieces alike,
    so they can only part where two pending merges form the same piece P with different splits (the
    converter ranks P's splits by their strings, sentencepiece takes the leftmost): P then occurs at
    two places in the word. A word in which no multi-split piece occurs twice needs no encoding."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    kind = sp_pb2.ModelProto.SentencePiece
    normal = {p.piece: p.score for p in proto.pieces if p.type == kind.NORMAL}
    single = all(p.type == kind.NORMAL for p in proto.pieces if len(p.piece) == 1)
    closed = all(c in normal for piece in normal for c in piece)
    if not (single and closed and len(set(normal.values())) == len(normal)):
        return False, frozenset()
    multi = frozenset(piece for piece in normal if len(piece) > 2 and sum(
        piece[:k] in normal and piece[k:] in normal for k in range(1, len(piece))) > 1)
    return True, multi


def encode_by_words(router: Any, texts: list[str], learn: Callable[[list[str], list[bool]], None],
                    rest: Callable[[list[str]], list[list[int]]]) -> tuple[list[list[int]], list[int]]:
    """Encode `texts` with a compiled WordRouter: (ids per text, the router's status per text, 0 where it gave them).

    Its words met for the first time go to learn(words, doubtful), which must router.learn() every one of them;
    the texts that held them are then encoded again. rest(texts) encodes what the router does not (status 1)."""
    ids, status, new_words, doubtful = router.encode(texts)
    if new_words:
        learn(new_words, doubtful)
        pending = [i for i, s in enumerate(status) if s == 2]
        again, again_status, _, _ = router.encode([texts[i] for i in pending])
        for i, text_ids, s in zip(pending, again, again_status):
            ids[i], status[i] = text_ids, s  # learn() keeps every word it was given: 0 or 1 now
    others = [i for i, s in enumerate(status) if s != 0]
    for i, text_ids in zip(others, rest([texts[i] for i in others]) if others else []):
        ids[i] = text_ids
    return ids, status


def word_split_obstacle(proto: Any) -> str | None:
    """Why a lossless model's ids for a text are not its words' ids put together (a word: a run of spaces and the
    run of other characters after it), or None when they are."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    spec, kind = proto.normalizer_spec, sp_pb2.ModelProto.SentencePiece
    if proto.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        return "not a BPE model"
    if (spec.name != "identity" or spec.precompiled_charsmap or spec.add_dummy_prefix or spec.remove_extra_whitespaces
            or spec.escape_whitespaces):
        return "it normalises text (a charsmap, a dummy prefix, whitespace collapsing or escaping)"
    for i, p in enumerate(proto.pieces):
        if p.type in (kind.USER_DEFINED, kind.UNUSED):
            return f"piece {i} {p.piece!r} is {kind.Type.Name(p.type).lower().replace('_', '-')}"
        if p.type == kind.NORMAL and re.search("[^ ] ", p.piece):
            return f"piece {i} {p.piece!r} holds a space after another character (merges across words)"
    return None


def lossless_router(proto: Any, limit: int = 1_000_000) -> Any:
    """The compiled word cache of a lossless model (see the module docstring), or None when its words do not
    decompose a text's encoding."""
    if word_split_obstacle(proto) is not None:
        return None
    return compiled_helpers().WordRouter([], [ord(" ")], limit, True, [], leading_spaces=True)


def sentencepiece_agreement(proto: Any) -> SentencePieceAgreement:
    """For which texts a sentencepiece model's own encoder gives the ids of its tokenizers-library conversion."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sp_pb2.TrainerSpec.BPE:
        return SentencePieceAgreement(f"a {sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} model, not BPE")
    settings = (spec.remove_extra_whitespaces, spec.add_dummy_prefix, spec.escape_whitespaces,
                not trainer.treat_whitespace_as_suffix)
    if not all(settings):
        return SentencePieceAgreement("whitespace settings other than sentencepiece's defaults (remove extra "
                                      "whitespaces, dummy prefix, escaped whitespace, whitespace as prefix)")
    obstacle = bpe_obstacle(proto)
    if obstacle is not None:
        return SentencePieceAgreement(obstacle)
    return SentencePieceAgreement.usable_for(charsmap_rules(spec.precompiled_charsmap), *bpe_shortcut(proto))
