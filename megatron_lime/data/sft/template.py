"""The SFT template and its loss mask.

One training example is a conversation rendered as

    [<context> context_text] <user> u_1 <assistant> a_1 <eos> [<user> u_2 <assistant> a_2 <eos> ...]

with the special ids of the tokenizer for the tags and no spaces added around them, so a
single-turn example starts exactly like the model card's inference prompt
`"<user>" + question + "<assistant>"`. Each text piece is encoded on its own, as the
Hugging Face tokenizer does when it splits a prompt at its special tokens.

The loss mask marks the tokens the model is trained to produce: every assistant reply and
the `<eos>` that ends it. Context, tags and user turns are masked (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from megatron_lime.errors import LimeInputError

OverLengthPolicy = Literal["drop", "truncate"]
OVER_LENGTH_POLICIES: tuple[str, ...] = ("drop", "truncate")


class SFTTokenizer(Protocol):
    """What the template needs from a tokenizer (megatron_lime.tokenizer.LimeTokenizer has it)."""

    eos_id: int
    user_id: int | None
    assistant_id: int | None
    context_id: int | None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class Turn:
    """One exchange: what the user said and the reply the model is trained to give."""

    user: str
    assistant: str


@dataclass(frozen=True)
class SFTExample:
    """A conversation in the template's terms, before tokenisation."""

    turns: tuple[Turn, ...]
    context: str | None = None  # retrieval context or system message; None when there is none

    def __post_init__(self) -> None:
        if not self.turns:
            raise ValueError("an SFT example needs at least one turn")

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1


@dataclass
class EncodedExample:
    """The token ids of each text piece of an example, tags not yet added."""

    context: list[int] | None
    turns: list[tuple[list[int], list[int]]]  # (user ids, assistant ids) per turn


@dataclass
class RenderedExample:
    """An example in the template: tokens and the parallel 0/1 loss mask (1 = trained target)."""

    token_ids: list[int]
    loss_mask: list[int]
    context_truncated: bool = False  # the context was shortened or removed to fit
    turns_dropped: int = 0  # trailing turns removed to fit

    @property
    def truncated(self) -> bool:
        return self.context_truncated or self.turns_dropped > 0

    @property
    def num_trained_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TemplateIds:
    """The special ids the template writes."""

    eos_id: int
    user_id: int
    assistant_id: int
    context_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: SFTTokenizer) -> "TemplateIds":
        missing = [name for name in ("user_id", "assistant_id", "context_id") if getattr(tokenizer, name) is None]
        if missing:
            raise ValueError(
                f"tokenizer {tokenizer!r} has no {', '.join(m.removesuffix('_id') for m in missing)} special token(s): "
                "the SFT template needs <user>, <assistant> and <context> (megatron_lime.tokenizer.build_tokenizer "
                "with chat_tokens=True adds them as new ids, as tools/preprocess_sft_data.py does)"
            )
        return cls(eos_id=tokenizer.eos_id, user_id=tokenizer.user_id, assistant_id=tokenizer.assistant_id,
                   context_id=tokenizer.context_id)


def encode_prompt(question: str, tokenizer: SFTTokenizer, context: str | None = None) -> list[int]:
    """The inference prompt `[<context>context]<user>question<assistant>`: the template up to the first reply,
    which the model was trained to continue (generation uses it; the export's chat template renders the same)."""
    ids = TemplateIds.from_tokenizer(tokenizer)
    pieces = tokenizer.encode_batch([question] if context is None else [context, question])
    prefix = [ids.context_id, *pieces[0]] if context is not None else []
    return prefix + [ids.user_id, *pieces[-1], ids.assistant_id]


def encode_examples(examples: Sequence[SFTExample], tokenizer: SFTTokenizer) -> list[EncodedExample]:
    """Encode every text piece of every example with one `encode_batch` call."""
    texts: list[str] = []
    for example in examples:
        if example.context is not None:
            texts.append(example.context)
        for turn in example.turns:
            texts.extend((turn.user, turn.assistant))
    ids = iter(tokenizer.encode_batch(texts))
    encoded = []
    for example in examples:
        context = next(ids) if example.context is not None else None
        turns = [(next(ids), next(ids)) for _ in example.turns]
        encoded.append(EncodedExample(context=context, turns=turns))
    return encoded


def _turn_tokens(user: list[int], assistant: list[int], ids: TemplateIds) -> tuple[list[int], list[int]]:
    tokens = [ids.user_id, *user, ids.assistant_id, *assistant, ids.eos_id]
    mask = [0] * (len(user) + 2) + [1] * (len(assistant) + 1)
    return tokens, mask


def render(encoded: EncodedExample, ids: TemplateIds, max_tokens: int | None = None,
           over_length: OverLengthPolicy = "truncate") -> RenderedExample | None:
    """Lay the example out in the template; None when it does not fit and the policy drops it.

    max_tokens: the most tokens an example may have (None: no limit).
    over_length: "drop" drops an example longer than max_tokens; "truncate" first shortens the
        context (keeping its beginning; the whole context block goes when not even one context
        token fits), then drops trailing turns of a multi-turn conversation, and drops the
        example only when its first turn alone is too long.
    """
    if over_length not in OVER_LENGTH_POLICIES:
        raise LimeInputError(f"over_length must be one of {OVER_LENGTH_POLICIES}, got {over_length!r}")
    turn_parts = [_turn_tokens(user, assistant, ids) for user, assistant in encoded.turns]
    turn_lengths = [len(tokens) for tokens, _ in turn_parts]
    context = encoded.context
    context_block = 0 if context is None else 1 + len(context)
    context_truncated, turns_kept = False, len(turn_parts)

    if max_tokens is not None and context_block + sum(turn_lengths) > max_tokens:
        if over_length == "drop":
            return None
        room_for_context = max_tokens - sum(turn_lengths) - 1  # 1 for the <context> tag
        if context is not None:
            context_truncated = True
            context = context[:room_for_context] if room_for_context > 0 else None
        if sum(turn_lengths) > max_tokens:
            # Not even the turns fit without context: keep the longest prefix of whole turns.
            while turns_kept > 0 and sum(turn_lengths[:turns_kept]) > max_tokens:
                turns_kept -= 1
            if turns_kept == 0:
                return None

    tokens: list[int] = []
    mask: list[int] = []
    if context is not None:
        tokens += [ids.context_id, *context]
        mask += [0] * (1 + len(context))
    for turn_tokens, turn_mask in turn_parts[:turns_kept]:
        tokens += turn_tokens
        mask += turn_mask
    return RenderedExample(token_ids=tokens, loss_mask=mask, context_truncated=context_truncated,
                           turns_dropped=len(turn_parts) - turns_kept)


def render_examples(examples: Sequence[SFTExample], tokenizer: SFTTokenizer, max_tokens: int | None = None,
                    over_length: OverLengthPolicy = "truncate") -> list[RenderedExample | None]:
    """Tokenise and render a batch of examples (see `render`)."""
    ids = TemplateIds.from_tokenizer(tokenizer)
    return [render(e, ids, max_tokens, over_length) for e in encode_examples(examples, tokenizer)]
