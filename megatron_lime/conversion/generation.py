"""Text generation from a LIME checkpoint or a Hugging Face export (tools/generate.py is the CLI).

Every layout loads through megatron_lime.checkpoint.load_model (verified, with the tokenizer the
checkpoint records; an export carries its own) and is converted in memory, with the export's weight
map, into the exported Hugging Face model class (modeling_lime.LimeForCausalLM), so generation uses
transformers' `generate` exactly as users of the export do.

Prompts follow the SFT template, `[<context>context]<user>question<assistant>` (no spaces around
the tags; data/sft/template.encode_prompt builds them), unless `raw=True` (base models: the text is
continued as is).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TextIO

import torch

from megatron_lime.checkpoint import LoadedModel, detect_layout, load_model
from megatron_lime.conversion.card import CARD_DECODING
from megatron_lime.checkpoint.hf_names import HF_TIED_HEAD, lime_config_to_hf, lime_to_hf_state_dict
from megatron_lime.data.sft.template import encode_prompt
from megatron_lime.errors import LimeInputError

logger = logging.getLogger(__name__)

Strategy = Literal["greedy", "beam", "sample", "card"]
STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample", "card")


@dataclass
class DecodingSettings:
    """What `generate` is asked to do; `card` reproduces the model card's call exactly."""

    strategy: Strategy = "greedy"
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    num_beams: int = 4  # beam only
    temperature: float = 0.8  # sample only
    top_p: float = 0.95  # sample only
    top_k: int = 0  # sample only; 0 = off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def generate_kwargs(self, pad_id: int, eos_id: int) -> dict[str, Any]:
        """Every decoding argument spelled out, so the export's generation_config.json defaults never leak in."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        common = dict(pad_token_id=pad_id, eos_token_id=eos_id)
        if self.strategy == "card":
            return dict(CARD_DECODING, top_k=None, **common)
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                      repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                      **common)
        if self.strategy == "greedy":
            return dict(kwargs, do_sample=False, num_beams=1, top_p=None, temperature=None, top_k=None)
        if self.strategy == "beam":
            return dict(kwargs, do_sample=False, num_beams=self.num_beams, early_stopping=True, top_p=None,
                        temperature=None, top_k=None)
        return dict(kwargs, do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k or None)

    @property
    def streams(self) -> bool:
        """transformers streams only single-beam decoding; beam search prints its result at the end."""
        return self.strategy in ("greedy", "sample")


class TokenStreamer:
    """A transformers streamer (put/end) that prints text as tokens arrive.

    The first `put` is the prompt (generate sends it first) and is skipped. Text is decoded from
    all tokens so far and only the new suffix is printed; a trailing U+FFFD (half of a multi-byte
    character split across byte-fallback tokens) is held back until the character completes.
    """

    def __init__(self, decode: Callable[[list[int]], str], out: TextIO = sys.stdout):
        self.decode = decode
        self.out = out
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError("TokenStreamer streams one sequence (batch size 1)")
            value = value[0]
        self.tokens.extend(int(t) for t in value.tolist())
        text = self.decode(self.tokens)
        stable = len(text.rstrip("\ufffd"))
        if stable > self.printed:
            self.out.write(text[self.printed:stable])
            self.out.flush()
            self.printed = stable

    def end(self) -> None:
        text = self.decode(self.tokens)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        self.printed = len(text)


@dataclass
class Generator:
    """A Hugging Face LimeForCausalLM with the prompt encoder and decoder that fit its tokenizer."""

    model: Any  # modeling_lime.LimeForCausalLM
    encode_prompt: Callable[[str, str | None, bool], list[int]]  # (question, context, raw) -> ids
    decode: Callable[[list[int]], str]  # ids -> text, special tokens dropped
    pad_id: int
    eos_id: int
    source: str

    @torch.no_grad()
    def generate(self, prompt: str, settings: DecodingSettings, context: str | None = None, raw: bool = False,
                 stream_to: TextIO | None = None) -> list[int]:
        """The new token ids for one prompt (streamed to `stream_to` as they come when the strategy allows)."""
        ids = self.encode_prompt(prompt, context, raw)
        if not ids:
            raise ValueError("empty prompt")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, s)
        streamer = TokenStreamer(self.decode, stream_to) if stream_to is not None and settings.streams else None
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     streamer=streamer, **settings.generate_kwargs(self.pad_id, self.eos_id))
        new_ids = output[0, len(ids):].tolist()
        if stream_to is not None and streamer is None:
            stream_to.write(self.decode(new_ids) + "\n")
            stream_to.flush()
        return new_ids


def hf_model_from_weights(loaded: LoadedModel, pad_id: int, eos_id: int, dtype: torch.dtype,
                          device: str | torch.device) -> Any:
    """The exported model class holding `loaded`'s weights (converted in memory with the export's weight map)."""
    from megatron_lime.conversion.hf_files.configuration_lime import LimeConfig as HFLimeConfig
    from megatron_lime.conversion.hf_files.modeling_lime import LimeForCausalLM

    hf_config = HFLimeConfig(**lime_config_to_hf(loaded.config), pad_token_id=pad_id, eos_token_id=eos_id)
    hf_state = lime_to_hf_state_dict(loaded.state_dict, loaded.config.num_layers)
    # Built on the meta device and filled by assignment: no time spent on a random initialisation.
    with torch.device("meta"):
        model = LimeForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if set(missing) != {HF_TIED_HEAD} or unexpected:
        raise KeyError(f"converted weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
    model.lm_head.weight = model.model.embed_tokens.weight  # the tie, redone after assignment
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    return model.to(device=device, dtype=dtype).eval()


def load_generator(path: str | Path, tokenizer_path: str | None = None, tag: str | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Generator:
    """A Generator for an exported folder, a DeepSpeed save dir or a consolidated checkpoint."""
    path = Path(path)
    if detect_layout(path) == "hf":
        if tag is not None:
            raise LimeInputError(f"{path}: --tag applies to DeepSpeed checkpoints, this is a Hugging Face folder")
        if tokenizer_path is not None:
            logger.warning("%s carries its own tokenizer; ignoring --tokenizer %s", path, tokenizer_path)
            tokenizer_path = None
    loaded = load_model(path, tag=tag, tokenizer=tokenizer_path)
    tokenizer = loaded.tokenizer
    special = {i for i in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.user_id, tokenizer.assistant_id,
                           tokenizer.context_id, tokenizer.unk_id) if i is not None}

    def encode(question: str, context: str | None, raw: bool) -> list[int]:
        return tokenizer.encode(question) if raw else encode_prompt(question, tokenizer, context)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in special])

    model = hf_model_from_weights(loaded, tokenizer.pad_id, tokenizer.eos_id, dtype, device)
    return Generator(model, encode, decode, tokenizer.pad_id, tokenizer.eos_id, loaded.source)
