"""Instruction-tuning data: adapters for the card's SFT datasets, the <user>/<assistant> template with
its loss mask, tools/preprocess_sft_data.py's core, and packed datasets for training (README.md)."""

from megatron_lime.data.readers import BadRecordError
from megatron_lime.data.sft.adapters import ADAPTERS, get_adapter
from megatron_lime.data.sft.template import SFTExample, Turn, render_examples


def __getattr__(name: str):
    # The training datasets import torch (a second): tools/preprocess_sft_data.py, which imports this package,
    # does not need them, so they are imported when first asked for.
    if name in ("SFTDataset", "SFTOptions"):
        from megatron_lime.data.sft import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTERS", "BadRecordError", "SFTExample", "SFTDataset", "SFTOptions", "Turn", "get_adapter",
           "render_examples"]
