"""Hugging Face export/import of LIME checkpoints and generation (see README.md in this folder).

    from megatron_lime.conversion import export_to_hf, import_from_hf, load_generator

Reading checkpoints (any layout) is megatron_lime.checkpoint's: load_model, load_lime_weights.
"""

from megatron_lime.checkpoint import LimeWeights, load_lime_weights, write_consolidated
from megatron_lime.conversion.generation import DecodingSettings, Generator, load_generator
from megatron_lime.conversion.hf_export import export_to_hf, import_from_hf

__all__ = ["DecodingSettings", "Generator", "LimeWeights", "export_to_hf", "import_from_hf", "load_generator",
           "load_lime_weights", "write_consolidated"]
