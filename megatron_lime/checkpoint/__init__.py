"""Checkpoints: one package owns the files; the trainer writes through it, every reader reads through it.

    format.py        every file name, tags and `latest`, the completion record (lime_config.json), what
                     --load names (resolve_load), which layout a folder holds (detect_layout)
    safe_load.py     .pt files through torch.load(weights_only=True) and a DeepSpeed allowlist; safetensors
    integrity.py     content hashes: recorded by the rank that wrote each file, checked before reading
    consolidated.py  the safetensors layouts: consolidated folders (write/read) and an export's weights
    hf_names.py      the one map between megatron_lime and Hugging Face names (weights and config), both ways
    weights.py       LimeWeights (megatron_lime names) from any layout: load_lime_weights
    loading.py       load_model(path): model, config and tokenizer, for evaluation, generation, export

What goes into a save and when, and the resume policy (schedule and model checks), are the trainer's:
megatron_lime/training/checkpointing.py. The layouts are described in format.py.
"""

from megatron_lime.checkpoint.format import (CONSOLIDATED_WEIGHTS, DS_CONFIG, EXPORT_RUN_FILE, HF_CONFIG,
                                             HF_WEIGHTS_INDEX, LATEST, LATEST_UNIVERSAL, LIME_CONFIG, MODEL_STATES,
                                             TAG_PATTERN, UNIVERSAL_SUFFIX, CheckpointError, Layout, LoadSource,
                                             config_path_of, detect_layout, holds_checkpoint, is_complete,
                                             is_consolidated, mark_complete, optimizer_shards, rank_files,
                                             read_latest, read_lime_config, resolve_load, rng_file, tag_dirs,
                                             tag_name, write_latest)
from megatron_lime.checkpoint.safe_load import (_torch_load, deepspeed_loads_safely, deepspeed_safe_globals,
                                                load_safetensors, numpy_array_safe_globals, torch_load)
from megatron_lime.checkpoint import integrity
from megatron_lime.checkpoint.consolidated import read_consolidated, read_export, write_consolidated, write_safetensors
from megatron_lime.checkpoint.weights import LimeWeights, load_lime_weights
from megatron_lime.checkpoint.loading import LoadedModel, load_model

__all__ = [
    "CONSOLIDATED_WEIGHTS", "DS_CONFIG", "EXPORT_RUN_FILE", "HF_CONFIG", "HF_WEIGHTS_INDEX", "LATEST",
    "LATEST_UNIVERSAL", "LIME_CONFIG", "MODEL_STATES", "TAG_PATTERN", "UNIVERSAL_SUFFIX", "CheckpointError",
    "Layout", "LimeWeights", "LoadSource", "LoadedModel", "_torch_load", "config_path_of", "deepspeed_loads_safely",
    "deepspeed_safe_globals", "detect_layout", "holds_checkpoint", "integrity", "is_complete", "is_consolidated",
    "load_lime_weights", "load_model", "load_safetensors", "mark_complete", "numpy_array_safe_globals",
    "optimizer_shards", "rank_files", "read_consolidated", "read_export", "read_latest", "read_lime_config",
    "resolve_load", "rng_file", "tag_dirs", "tag_name", "torch_load", "write_consolidated",
    "write_latest", "write_safetensors",
]
