"""The LIME tokenizer: load it (ours or the user's own), encode raw text, export it for Hugging Face.

One module per job (every name below is also importable from `megatron_lime.tokenizer`):
  spec.py         special tokens, Megatron-LM's --tokenizer-type kinds, TokenizerSpec, add_tokenizer_args
  core.py         LimeTokenizer and its kinds, load_tokenizer, build_tokenizer (what tools call), the export
                  files (LimeTokenizer.save_hf)
  huggingface.py  the `tokenizers` form of sentencepiece models
  agreement.py    when sentencepiece itself gives the ids of a model's `tokenizers` form (the fast path)
  conversion_cache.py  a standard sentencepiece model's `tokenizers` form and agreement, computed once and kept
                  on disk ($MEGATRON_LIME_CACHE, else ~/.cache/megatron-lime; `off` to compute every time)
  training.py     train_tokenizer (tools/train_tokenizer.py); every file goes through megatron_lime/files.py

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

from megatron_lime.tokenizer.agreement import SentencePieceAgreement, sentencepiece_agreement
from megatron_lime.tokenizer.core import (CONVERSION_PROBE, ConvertedSentencePieceTokenizer, HuggingFaceTokenizer,
                                          LimeTokenizer, SentencePieceTokenizer, build_tokenizer,
                                          describe_added_chat_tokens, load_sentencepiece, load_tokenizer)
from megatron_lime.tokenizer.huggingface import (converted_sentencepiece_backend, lossless_sentencepiece_backend,
                                                 sentencepiece_bpe_merges)
from megatron_lime.tokenizer.spec import (CHAT_TOKENS, GPT2_FILES, MODEL_MAX_LENGTH, SENTENCEPIECE_FILE,
                                          SENTENCEPIECE_TYPES, SPECIAL_TOKENS, TOKENIZER_ARG_HELP, TOKENIZER_TYPES,
                                          SpecialTokens, TokenizerSpec, add_tokenizer_args)
from megatron_lime.tokenizer.training import train_tokenizer

__all__ = [
    "CHAT_TOKENS", "CONVERSION_PROBE", "GPT2_FILES", "MODEL_MAX_LENGTH", "SENTENCEPIECE_FILE", "SENTENCEPIECE_TYPES",
    "SPECIAL_TOKENS", "TOKENIZER_ARG_HELP", "TOKENIZER_TYPES", "ConvertedSentencePieceTokenizer",
    "HuggingFaceTokenizer", "LimeTokenizer", "SentencePieceAgreement", "SentencePieceTokenizer", "SpecialTokens",
    "TokenizerSpec", "add_tokenizer_args", "build_tokenizer", "converted_sentencepiece_backend",
    "describe_added_chat_tokens", "sentencepiece_agreement", "load_sentencepiece", "load_tokenizer",
    "lossless_sentencepiece_backend", "sentencepiece_bpe_merges", "train_tokenizer",
]
