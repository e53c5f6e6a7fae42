"""When sentencepiece's own encoder gives exactly the ids of a model's tokenizers-library conversion.

A sentencepiece model that is not ours (a standard BPE model: nmt_nfkc normalisation, dummy prefix,
whitespace escaping and collapsing, byte fallback) is exported in the form transformers' converter
gives it (huggingface.converted_sentencepiece_backend), and the data must hold exactly that form's
ids. Sentencepiece encodes about 1.5x faster, so preprocessing uses it for every text where the two
provably agree, and the conversion for the rest. `sentencepiece_agreement(proto)` works out, once
when the model is loaded, whether and for which texts that holds:

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
     * a single-character key other than a control character (Unicode category Cc, not CR):
       controls always form their own grapheme cluster (UAX #29, GB4/GB5; only CR LF joins), so
       both encoders replace exactly that character by its value, and nothing else, or
     * U+2581 (the whitespace meta symbol: sentencepiece strips a trailing literal one as if it
       were an escaped space; the conversion does not).
   On a covered text both normalisers are the same per-character map.
2. Whitespace. Sentencepiece with remove_extra_whitespaces, add_dummy_prefix and
   escape_whitespaces strips leading and trailing spaces (U+0020 only), collapses runs of them,
   returns nothing if nothing is left, else prepends one and writes spaces as U+2581. The converter
   builds the same steps (Replace `\\A +| +\\z`, Replace ` {2,}`, Replace ` ` -> U+2581, Metaspace
   prepend). We require exactly these three settings and no treat_whitespace_as_suffix; any other
   combination is left to the conversion.
3. BPE. Both start from one symbol per character and repeatedly merge the best adjacent pair whose
   concatenation is a normal piece: sentencepiece the highest score, the leftmost on a tie; the
   converted BPE the lowest merge rank, ranked by piece score, then by the split's strings, the
   leftmost on a tie. They pick the same pair at every step when
     * the model is BPE (unigram: ties between segmentations are broken differently) with no
       user-defined or unused pieces (those change sentencepiece's matching) and every
       single-character piece is a normal piece;
     * normal pieces have pairwise different scores, so a tie is always one piece P;
     * P can be pending twice in overlapping places with different splits only as (x, s) and
       (s, y) with x + s == s + y, x != s; we refuse a model where such a P ranks (s, y) before
       (x, s) (the conversion would merge the right one first);
     * no piece with a higher score than a piece P that has two or more splits contains P: then,
       once P is the best pair, every pending P merges before anything else in both encoders,
       whatever their order, and both reach the same symbols.
   Unknown characters: byte fallback must be on with all 256 byte pieces; every character of a
   normal piece must be a piece itself, so an unknown character never merges and both encoders
   write its UTF-8 bytes as <0xXX> ids.

tests/test_tokenizer.py checks agreement on adversarial text (unicode, whitespace runs, byte
fallback, digits, empty) and that a model breaking a condition is encoded by the conversion.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

META = "\u2581"  # sentencepiece's whitespace symbol


@dataclass(frozen=True)
class SentencePieceAgreement:
    """Whether sentencepiece may encode a text in place of the conversion: `reason` None and `covers(text)`."""

    reason: str | None  # why sentencepiece is never used for this model; None when it is, for covered texts
    unsafe: frozenset[str] = frozenset()  # a text holding any of these characters goes to the conversion
    _ascii_unsafe: tuple[str, ...] = field(default=(), repr=False)
    _pattern: Any = field(default=None, repr=False)

    @classmethod
    def usable_for(cls, unsafe: set[str]) -> "SentencePieceAgreement":
        ranges = _char_class(sorted(unsafe))
        pattern = re.compile(f"[{ranges}]") if ranges else None
        return cls(None, frozenset(unsafe), tuple(sorted(c for c in unsafe if c.isascii())), pattern)

    @property
    def usable(self) -> bool:
        return self.reason is None

    def covers(self, text: str) -> bool:
        """True when sentencepiece provably gives the conversion's ids for `text` (see the module docstring)."""
        if self.reason is not None:
            return False
        if text.isascii():
            return not any(c in text for c in self._ascii_unsafe)
        return self._pattern is None or self._pattern.search(text) is None


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
    """Every key -> value of a sentencepiece precompiled charsmap (a Darts double-array trie + a string pool)."""
    if not charsmap:
        return {}
    trie_size = int.from_bytes(charsmap[:4], "little")
    units = [int.from_bytes(charsmap[4 + 4 * k:8 + 4 * k], "little") for k in range(trie_size // 4)]
    pool = charsmap[4 + trie_size:]

    def offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    rules: dict[str, str] = {}
    stack = [(offset(units[0]), b"")]
    while stack:
        node, key = stack.pop()
        for byte in range(1, 256):
            child = node ^ byte
            if child >= len(units) or units[child] & ((1 << 31) | 0xFF) != byte:
                continue
            unit = units[child]
            nxt = child ^ offset(unit)
            if (unit >> 8) & 1:  # has a leaf: key + byte is a key
                start = units[nxt] & ((1 << 31) - 1)
                end = pool.index(b"\0", start)
                rules[(key + bytes([byte])).decode("utf-8")] = pool[start:end].decode("utf-8")
            stack.append((nxt, key + bytes([byte])))
    return rules


def unsafe_characters(rules: dict[str, str]) -> set[str]:
    """The characters that keep a text off sentencepiece (normaliser part of the module docstring)."""
    unsafe = {META}
    for key, value in rules.items():
        if len(key) > 1:
            unsafe.update(key[1:])
        elif key == "\r" or unicodedata.category(key) != "Cc" or META in value:
            unsafe.add(key)
    return unsafe


def bpe_hazard(proto: Any) -> str | None:
    """Why sentencepiece's BPE and the converted BPE could pick different pairs (BPE part of the docstring), or None."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    kind = sp_pb2.ModelProto.SentencePiece
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == kind.NORMAL}
    for i, p in enumerate(proto.pieces):
        if p.type in (kind.USER_DEFINED, kind.UNUSED):
            return f"piece {i} {p.piece!r} is {kind.Type.Name(p.type).lower().replace('_', '-')}"
        if len(p.piece) == 1 and p.type != kind.NORMAL:
            return f"the one-character piece {i} {p.piece!r} is not a normal piece"
    if len({score for score, _ in normal.values()}) != len(normal):
        return "two normal pieces have the same score"
    for piece in normal:
        missing = next((c for c in piece if c not in normal), None)
        if missing is not None:
            return f"piece {piece!r} holds {missing!r}, which is not a piece of its own"
    splits = {piece: [(piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in normal and piece[k:] in normal] for piece in normal}
    multi = {piece for piece, s in splits.items() if len(s) > 1}
    for piece in multi:
        # The converter ranks one piece's splits by (left, right); sentencepiece takes the leftmost.
        for x, s in splits[piece]:
            y = piece[len(s):] if piece.startswith(s) else None
            if x != s and y is not None and (s, y) in splits[piece] and (s, y) < (x, s):
                return (f"piece {piece!r} can be pending as ({x!r}, {s!r}) and ({s!r}, {y!r}) in overlapping places, "
                        "and the conversion merges the right one first")
    # A higher-scoring piece that contains a piece with several splits: every substring of every piece.
    for other, (score, _) in normal.items():
        for start in range(len(other)):
            for end in range(start + 2, len(other) + (start > 0)):
                inner = other[start:end]
                if inner in multi and normal[inner][0] < score:
                    return (f"piece {other!r} scores higher than {inner!r}, which it contains and which has "
                            f"{len(splits[inner])} splits")
    return None


def sentencepiece_agreement(proto: Any) -> SentencePieceAgreement:
    """For which texts a sentencepiece model's own encoder gives the ids of its tokenizers-library conversion."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sp_pb2.TrainerSpec.BPE:
        return SentencePieceAgreement(f"a {sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} model, not BPE")
    if not trainer.byte_fallback:
        return SentencePieceAgreement("no byte fallback (unknown characters)")
    pieces = {p.piece: p.type for p in proto.pieces}
    if any(pieces.get(f"<0x{b:02X}>") != sp_pb2.ModelProto.SentencePiece.BYTE for b in range(256)):
        return SentencePieceAgreement("not all 256 byte pieces <0x00>..<0xFF> are there")
    settings = (spec.remove_extra_whitespaces, spec.add_dummy_prefix, spec.escape_whitespaces,
                not trainer.treat_whitespace_as_suffix)
    if not all(settings):
        return SentencePieceAgreement("whitespace settings other than sentencepiece's defaults (remove extra "
                                      "whitespaces, dummy prefix, escaped whitespace, whitespace as prefix)")
    hazard = bpe_hazard(proto)
    if hazard is not None:
        return SentencePieceAgreement(f"BPE ties: {hazard}")
    return SentencePieceAgreement.usable_for(unsafe_characters(charsmap_rules(spec.precompiled_charsmap)))
