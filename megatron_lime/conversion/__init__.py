"""Hugging Face export/import of LIME checkpoints and generation (see README.md in this folder).

    from megatron_lime.conversion import load_lime_weights, export_to_hf, import_from_hf, load_generator
"""

from megatron_lime.conversion.checkpoints import LimeWeights, load_lime_weights, write_consolidated
from megatron_lime.conversion.generation import DecodingSettings, Generator, load_generator
from megatron_lime.conversion.hf_export import export_to_hf, import_from_hf

__all__ = ["DecodingSettings", "Generator", "LimeWeights", "export_to_hf", "import_from_hf", "load_generator",
           "load_lime_weights", "write_consolidated"]
