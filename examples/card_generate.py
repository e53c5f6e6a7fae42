#!/usr/bin/env python
"""Answer a question with an exported LIME folder exactly as the model card's usage snippet does.

    python examples/card_generate.py EXPORT_DIR "Write five questions for a Data Scientist interview."

The one difference from the card: `trust_remote_code=True` is passed to AutoTokenizer too, since
transformers 5.x reads config.json there and would otherwise stop at a 15 s "run custom code?" prompt.
`device_map="auto"` is left out because it needs the accelerate package.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_lime.conversion.card import CARD_DECODING  # the decoding the card prints, one constant


def build_prompt(question: str) -> str:
    return "<user>" + question + "<assistant>"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    model_name, question = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.bfloat16, trust_remote_code=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    inputs = tokenizer(build_prompt(question), return_tensors="pt").to(model.device)
    input_length = inputs["input_ids"].shape[1]
    outputs = model.generate(
        **inputs,
        **CARD_DECODING,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated_tokens = outputs[0][input_length:]
    print(f"question: {question}")
    print(f"answer ({len(generated_tokens)} tokens): {tokenizer.decode(generated_tokens, skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
