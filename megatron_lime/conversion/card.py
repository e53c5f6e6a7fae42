"""The README.md (model card) of a Hugging Face export, filled from the run that made the weights."""

from __future__ import annotations

import textwrap
from typing import Any

from megatron_lime.checkpoint import LimeWeights

# The model card's decoding: its usage snippet, the `card` strategy of tools/generate.py and
# examples/card_generate.py all pass exactly these to generate(); the export's
# generation_config.json holds them too, as generate()'s defaults (see generation_defaults).
CARD_DECODING: dict[str, Any] = dict(max_new_tokens=128, num_beams=4, early_stopping=True, repetition_penalty=1.15,
                                     no_repeat_ngram_size=3, min_new_tokens=16, do_sample=False, top_p=None,
                                     temperature=None)


def generation_defaults() -> dict[str, Any]:
    """CARD_DECODING for generation_config.json: without min_new_tokens (a default that would force 16 tokens
    on every caller) and without the None entries (they only switch off sampling defaults)."""
    return {k: v for k, v in CARD_DECODING.items() if v is not None and k != "min_new_tokens"}


def _card_decoding_lines(indent: str = "    ") -> str:
    text = ", ".join(f"{name}={value!r}" for name, value in CARD_DECODING.items()) + ","
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent)

# Training arguments worth showing on the card, when the run recorded them (Megatron names).
_CARD_ARGS = ("recipe", "seq_length", "micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr",
              "lr_warmup_fraction", "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad",
              "zero_stage", "seed")


def _count(n: float | int | None) -> str:
    if n is None:
        return "not recorded"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit} ({int(n):,})"
    return f"{int(n):,}"


def _stage(metadata: dict[str, Any]) -> str:
    return {"gpt": "pretrained base model (causal LM)",
            "sft": "instruction-tuned (SFT)"}.get(metadata.get("dataset_type"), "not recorded")


def render_model_card(weights: LimeWeights, tokenizer: Any, dtype: str, supported_transformers: str) -> str:
    """Markdown model card: architecture, data, steps and tokens seen, usage as users run it."""
    import torch
    import transformers

    config, meta = weights.config, weights.metadata
    data_paths = meta.get("data_path") or []
    if isinstance(data_paths, str):
        data_paths = [data_paths]
    # The trainer records its flags grouped ({"training": {...}, "optimizer": {...}}); flat works too.
    recorded = meta.get("args") or {}
    args = {k: v for k, v in recorded.items() if not isinstance(v, dict)}
    for group in (v for v in recorded.values() if isinstance(v, dict)):
        args.update(group)
    arg_rows = "\n".join(f"| {name} | {args[name]} |" for name in _CARD_ARGS if name in args)
    data_rows = "\n".join(f"- `{p}`" for p in data_paths) or "- not recorded"
    title = f"LIME ({config.name})" if config.name != "custom" else "LIME"
    return f"""---
language:
- en
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- text-generation
- causal-lm
- lime
- megatron-lime
---

# {title}

A decoder-only Transformer trained with megatron-lime and exported to
Hugging Face format: {_stage(meta)}. The folder carries its own modeling code (sinusoidal
positions with RMSNorm have no native transformers architecture), so load it with
`trust_remote_code=True`.

## Architecture

| Component | Value |
|---|---|
| Architecture | Decoder-only Transformer |
| Parameters | {_count(config.num_parameters())} (tied embedding counted once) |
| Layers | {config.num_layers} |
| d_model | {config.hidden_size} |
| FFN dimension (d_ff) | {config.ffn_hidden_size} |
| Attention heads | {config.num_attention_heads} (head dim {config.head_dim}) |
| Vocabulary size | {config.vocab_size:,} |
| Max sequence length | {config.max_position_embeddings} tokens |
| Positional encoding | Sinusoidal (base {config.position_base:g}), added to the embedding scaled by sqrt(d_model) |
| Norm | RMSNorm (eps {config.norm_eps:g}), pre-norm |
| FFN | SiLU MLP (non-gated), no biases |
| Embeddings | Output head tied to the input embedding |
| Weights in this folder | {dtype} |

## Training run

| | |
|---|---|
| Stage | {_stage(meta)} |
| Steps (iterations) | {meta.get("iteration", "not recorded")} |
| Samples seen | {_count(meta.get("consumed_samples"))} |
| Tokens seen | {_count(meta.get("consumed_tokens"))} |
| Tokenizer | `{meta.get("tokenizer") or getattr(tokenizer, "path", "not recorded")}` ({tokenizer.vocab_size:,} ids) |
| Source checkpoint | {weights.source} |
{arg_rows}

Data:
{data_rows}

## Usage

```python
from transformers import AutoTokenizer, AutoModelForCausalLM
import torch

path = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, trust_remote_code=True)

prompt = "<user>" + "Write five questions for a Data Scientist interview." + "<assistant>"
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
outputs = model.generate(
    **inputs,
{_card_decoding_lines()}
    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
)
print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`device_map="auto"` also works when `accelerate` is installed. Pass `trust_remote_code=True` to
`AutoTokenizer` as well: transformers 5.x reads config.json while loading a tokenizer, and without
it stops for up to 15 s at an interactive "run the custom code?" prompt (the tokenizer itself is a
plain fast tokenizer and runs no custom code).

### Prompt format

`[<context>context]<user>question<assistant>` and the model answers, ending with `<eos>`. The tags
are single special tokens and no spaces are added around them. The tokenizer's chat template
produces exactly this: `tokenizer.apply_chat_template([{{"role": "user", "content": q}}],
add_generation_prompt=True, tokenize=False)` gives `"<user>" + q + "<assistant>"`, and a
`system` (or `context`) message first becomes the `<context>` block. generation_config.json holds
the decoding above (without `min_new_tokens`) as the default for `generate()`.

Batches: the tokenizer pads on the left, and the model takes its positions from the attention
mask, so padded and unpadded prompts give the same tokens. Contexts longer than
{config.max_position_embeddings} tokens (prompt plus generated tokens) raise an error.

## Compatibility

transformers {supported_transformers} (exported with transformers {transformers.__version__},
torch {torch.__version__}). The KV cache is a transformers `Cache` (DynamicCache); attention
runs through `torch.nn.functional.scaled_dot_product_attention`.

## Limitations

Not RLHF/DPO-aligned, no tool use, no multi-turn chat training beyond what the SFT data held;
English only. Outputs can be wrong or biased: check them before use.
"""
