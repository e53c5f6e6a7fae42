"""Instruction-tuning data: adapters for the card's SFT datasets, the <user>/<assistant> template with
its loss mask, tools/preprocess_sft_data.py's core, and packed datasets for training (README.md)."""

from megatron_lime.data.readers import BadRecordError
from megatron_lime.data.sft.adapters import ADAPTERS, get_adapter
from megatron_lime.data.sft.dataset import SFTDataset, SFTOptions
from megatron_lime.data.sft.template import SFTExample, Turn, render_examples

__all__ = ["ADAPTERS", "BadRecordError", "SFTExample", "SFTDataset", "SFTOptions", "Turn", "get_adapter",
           "render_examples"]
