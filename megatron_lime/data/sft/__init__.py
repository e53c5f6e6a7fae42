"""Instruction-tuning data: adapters for the card's SFT datasets, the <user>/<assistant> template with
its loss mask, tools/preprocess_sft_data.py's core, and packed datasets for training (README.md)."""

from megatron_lime.data.sft.adapters import ADAPTERS, BadRecordError, get_adapter
from megatron_lime.data.sft.dataset import build_sft_datasets
from megatron_lime.data.sft.template import SFTExample, Turn, render_examples

__all__ = ["ADAPTERS", "BadRecordError", "SFTExample", "Turn", "build_sft_datasets", "get_adapter", "render_examples"]
