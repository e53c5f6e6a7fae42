"""One adapter per instruction dataset: a row in the dataset's own columns -> an SFTExample.

Adapters are registered under the dataset's Hugging Face hub name (`get_adapter("yahma/alpaca-cleaned")`).
Each reads only the columns it names, so extra metadata columns (Magpie has dozens) are ignored.

How conversations become examples (the same for every dataset; see README.md):
  * one conversation = one example; every assistant turn is trained, earlier turns stay in the
    sequence as history (`<user> u1 <assistant> a1 <eos> <user> u2 <assistant> a2 <eos>`);
  * system messages at the start become the context block (`<context> system text`);
  * consecutive messages of the same role are joined with a blank line;
  * assistant messages before the first user message (a greeting) are dropped, and so is a
    trailing user message without a reply (there is nothing to train on);
  * a conversation with no user message followed by a reply, a system message after the
    first turn, an unknown role or an empty message is a bad record.

A row an adapter deliberately leaves out (RAG_Multilingual rows not in the chosen languages)
returns None and is counted as filtered, not as bad.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from megatron_lime.data.readers import BadRecordError
from megatron_lime.data.sft.template import SFTExample, Turn
from megatron_lime.errors import LimeInputError


def text_field(row: Mapping[str, Any], column: str, *, required: bool = True, allow_numbers: bool = False) -> str:
    """The stripped text of `row[column]`; "" when optional and missing or null."""
    if column not in row:
        if required:
            present = ", ".join(sorted(row)) or "none"
            raise BadRecordError.of_row(f"missing column {column!r} (columns present: {present})")
        return ""
    value = row[column]
    if value is None:
        if required:
            raise BadRecordError.of_row(f"column {column!r} is null")
        return ""
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRecordError.of_row(f"column {column!r} should be text, got {type(value).__name__}: {value!r:.80}")
    text = value.strip()
    if required and not text:
        raise BadRecordError.of_row(f"column {column!r} is empty")
    return text


ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
}


def conversation_to_example(messages: Any, role_key: str = "role", content_key: str = "content",
                            column: str = "messages") -> SFTExample:
    """Turn a list of {role, content} messages into an example (rules in the module docstring)."""
    if not isinstance(messages, (list, tuple)):
        raise BadRecordError.of_row(f"column {column!r} should be a list of messages, got {type(messages).__name__}")
    merged: list[tuple[str, str]] = []  # (role, text), consecutive same roles joined
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRecordError.of_row(f"{column}[{i}] should be a mapping with {role_key!r} and {content_key!r}, "
                                        f"got {type(message).__name__}")
        raw_role = message.get(role_key)
        role = ROLE_ALIASES.get(str(raw_role).strip().lower()) if raw_role is not None else None
        if role is None:
            raise BadRecordError.of_row(f"{column}[{i}] has unknown role {raw_role!r} "
                                        f"(known: {', '.join(ROLE_ALIASES)})")
        content = text_field(message, content_key)  # raises on missing / empty content
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n\n" + content)
        else:
            merged.append((role, content))

    context = None
    if merged and merged[0][0] == "system":
        context = merged.pop(0)[1]
    if merged and merged[0][0] == "assistant":
        merged.pop(0)  # a greeting before the user speaks: there is no request it answers
    if merged and merged[-1][0] == "user":
        merged.pop()  # a question without a reply: nothing to train on
    if not merged or merged[0][0] != "user":
        raise BadRecordError.of_row(f"column {column!r} has no user message followed by an assistant reply")
    turns = []
    for (user_role, user_text), (reply_role, reply_text) in zip(merged[0::2], merged[1::2]):
        if user_role != "user" or reply_role != "assistant":
            raise BadRecordError.of_row(f"column {column!r}: a system message after the first turn is not supported")
        turns.append(Turn(user=user_text, assistant=reply_text))
    return SFTExample(turns=tuple(turns), context=context)


def join_nonempty(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


@dataclass
class Adapter:
    """Maps rows of one dataset to examples. Subclasses set `hub_name` and `columns`, and define `convert`."""

    hub_name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the columns read (for documentation and error messages)
    description: ClassVar[str]

    def convert(self, row: Mapping[str, Any]) -> SFTExample | None:
        raise NotImplementedError


# Wikipedia footnote markers copied into dolly's contexts and responses: "[3]", "[12]", "[citation needed]".
CITATION_MARKER = re.compile(r"[ \t]*\[(?:\d{1,3}|citation needed)\]")


def strip_citation_markers(text: str) -> str:
    return CITATION_MARKER.sub("", text).strip()


@dataclass
class DollyAdapter(Adapter):
    hub_name = "databricks/databricks-dolly-15k"
    columns = ("instruction", "context", "response")
    description = "context (often empty) -> context block; Wikipedia citation markers like [3] removed"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        context = strip_citation_markers(text_field(row, "context", required=False))
        response = strip_citation_markers(text_field(row, "response"))
        if not response:
            raise BadRecordError.of_row("column 'response' is empty once citation markers are removed")
        return SFTExample(turns=(Turn(text_field(row, "instruction"), response),), context=context or None)


@dataclass
class AlpacaAdapter(Adapter):
    hub_name = "yahma/alpaca-cleaned"
    columns = ("instruction", "input", "output")
    description = "input (often empty) is the instruction's argument: appended to the user turn after a blank line"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        # Alpaca's input is part of the request ("Translate this sentence:" + the sentence), not
        # retrieved background, so it belongs with the question, as a user would type it.
        user = join_nonempty(text_field(row, "instruction"), text_field(row, "input", required=False))
        return SFTExample(turns=(Turn(user, text_field(row, "output")),))


@dataclass
class GPT4LLMCleanedAdapter(AlpacaAdapter):
    hub_name = "teknium/GPT4-LLM-Cleaned"


@dataclass
class NoRobotsAdapter(Adapter):
    hub_name = "HuggingFaceH4/no_robots"
    columns = ("messages",)
    description = "messages: a leading system message -> context; Chat rows are multi-turn"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        if "messages" not in row:
            raise BadRecordError.of_row(f"missing column 'messages' (columns present: {', '.join(sorted(row))})")
        return conversation_to_example(row["messages"])


@dataclass
class EverydayConversationsAdapter(NoRobotsAdapter):
    hub_name = "HuggingFaceTB/everyday-conversations-llama3.1-2k"
    description = "messages (always multi-turn): every assistant turn trained"


@dataclass
class MagpieAdapter(Adapter):
    hub_name = "Magpie-Align/Magpie-Pro-300K-Filtered"
    columns = ("conversations", "instruction", "response")
    description = "conversations [{from: human|gpt, value}] when present, else instruction / response"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        conversations = row.get("conversations")
        if conversations is not None and len(conversations) > 0:  # the full dialogue (multi-turn variants too)
            return conversation_to_example(conversations, role_key="from", content_key="value",
                                           column="conversations")
        return SFTExample(turns=(Turn(text_field(row, "instruction"), text_field(row, "response")),))


@dataclass
class WebInstructAdapter(Adapter):
    hub_name = "TIGER-Lab/WebInstruct-verified"
    columns = ("question", "answer")
    description = "question -> user, answer (a short final answer, possibly a number) -> response"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        return SFTExample(turns=(Turn(text_field(row, "question"), text_field(row, "answer", allow_numbers=True)),))


# synthetic-instruct-gptj-pairwise prompts are plain questions; some copies of such pairwise
# sets keep Anthropic-HH style speaker tags, which would otherwise be trained on as text.
HH_PREFIX = re.compile(r"^\s*Human:\s*")
HH_SUFFIX = re.compile(r"\s*Assistant:\s*$")


@dataclass
class DahoasPairwiseAdapter(Adapter):
    hub_name = "Dahoas/synthetic-instruct-gptj-pairwise"
    columns = ("prompt", "chosen")
    description = "prompt -> user, chosen -> response (rejected is not used); stray Human:/Assistant: tags removed"

    def convert(self, row: Mapping[str, Any]) -> SFTExample:
        prompt = HH_SUFFIX.sub("", HH_PREFIX.sub("", text_field(row, "prompt")))
        if not prompt:
            raise BadRecordError.of_row("column 'prompt' is empty once Human:/Assistant: tags are removed")
        return SFTExample(turns=(Turn(prompt, text_field(row, "chosen")),))


@dataclass
class RAGMultilingualAdapter(Adapter):
    hub_name = "projecte-aina/RAG_Multilingual"
    columns = ("instruction", "context", "response", "lang")
    description = "context -> context block; only rows whose lang is in `languages` (default: en)"

    languages: list[str] = field(default_factory=lambda: ["en"])

    def __post_init__(self) -> None:
        if isinstance(self.languages, str):
            self.languages = [self.languages]
        self.languages = [lang.strip().lower() for lang in self.languages]

    def convert(self, row: Mapping[str, Any]) -> SFTExample | None:
        if text_field(row, "lang").lower() not in self.languages:
            return None
        context = text_field(row, "context", required=False)
        return SFTExample(turns=(Turn(text_field(row, "instruction"), text_field(row, "response")),),
                          context=context or None)


ADAPTERS: dict[str, type[Adapter]] = {
    cls.hub_name: cls
    for cls in (EverydayConversationsAdapter, DollyAdapter, NoRobotsAdapter, GPT4LLMCleanedAdapter, MagpieAdapter,
                DahoasPairwiseAdapter, WebInstructAdapter, AlpacaAdapter, RAGMultilingualAdapter)
}


def get_adapter(name: str, options: Mapping[str, Any] | None = None) -> Adapter:
    """The adapter registered under a hub name (case-insensitive), built with its options."""
    by_lower = {key.lower(): cls for key, cls in ADAPTERS.items()}
    cls = by_lower.get(name.strip().lower())
    if cls is None:
        raise LimeInputError(f"no SFT adapter for dataset {name!r}; known datasets: {', '.join(ADAPTERS)}")
    try:
        return cls(**dict(options or {}))
    except TypeError as e:
        raise LimeInputError(f"bad options {dict(options or {})!r} for dataset {name!r}: {e}") from None
