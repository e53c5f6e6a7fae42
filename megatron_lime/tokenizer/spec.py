"""The tokenizer's names and flags: special tokens, Megatron-LM's --tokenizer-type kinds, TokenizerSpec and
add_tokenizer_args (the same tokenizer flags in every tool; training generates its own from TokenizerSpec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    group.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                       help=TOKENIZER_ARG_HELP["tokenizer_type"])
    group.add_argument("--tokenizer-model", "--tokenizer", dest="tokenizer_model", default=None,
                       help=TOKENIZER_ARG_HELP["tokenizer_model"])
    group.add_argument("--vocab-file", default=None, help=TOKENIZER_ARG_HELP["vocab_file"])
    group.add_argument("--merge-file", default=None, help=TOKENIZER_ARG_HELP["merge_file"])
    return group
