"""Write a Hugging Face folder for a LIME model, and read one back into our consolidated format.

The folder loads with no network through

    AutoTokenizer.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, trust_remote_code=True)

and holds: config.json (model_type "lime", auto_map, tie_word_embeddings), configuration_lime.py,
modeling_lime.py and integrity_lime.py (standalone, copied from hf_files/), model.safetensors (the
tied embedding stored once, names from checkpoint/hf_names.py), generation_config.json, the tokenizer files with the
chat template, README.md (a model card filled from the run) and lime_run.json (the run's record,
so `--from-hf` can give training its history back, and the content hash of every other file, which
modeling_lime.py checks in `from_pretrained` and megatron_lime's readers check before use).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_lime.checkpoint import (CONSOLIDATED_WEIGHTS, EXPORT_RUN_FILE, HF_CONFIG, LIME_CONFIG, LimeWeights,
                                      LoadedModel, integrity, load_lime_weights, write_consolidated, write_safetensors)
from megatron_lime.conversion.card import generation_defaults, render_model_card
from megatron_lime.checkpoint.hf_names import lime_config_to_hf, lime_to_hf_state_dict
from megatron_lime.errors import LimeInputError
from megatron_lime.files import atomic_directory, read_json, write_json, write_text

logger = logging.getLogger(__name__)

HF_FILES_DIR = Path(__file__).parent / "hf_files"
REMOTE_CODE_FILES = ("configuration_lime.py", "modeling_lime.py", "integrity_lime.py")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The transformers versions modeling_lime.py is written for (see its docstring).
SUPPORTED_TRANSFORMERS = ">=4.56, <=5.24"

# Renders `[<context>text]<user>question<assistant>` (the SFT template, data/sft/template.py):
# a system or context message, first and at most once, becomes the <context> block; earlier
# assistant turns end with the tokenizer's own eos token (`eos_token`: "<eos>" in ours, "</s>" in
# a LLaMA-style one), as in training. No spaces are added around the tags.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'context'] -%}"
    "{%- if not loop.first -%}{{ raise_exception('a system/context message must come first') }}{%- endif -%}"
    "<context>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}"
    "<user>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<assistant>{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role: ' + message['role'] + ' (use system, context, user or assistant)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)


def hf_config_dict(weights: LoadedModel, pad_id: int, eos_id: int, dtype: str) -> dict[str, Any]:
    import transformers

    return {
        "architectures": ["LimeForCausalLM"],
        "model_type": "lime",
        "auto_map": {
            "AutoConfig": "configuration_lime.LimeConfig",
            "AutoModel": "modeling_lime.LimeModel",
            "AutoModelForCausalLM": "modeling_lime.LimeForCausalLM",
        },
        **lime_config_to_hf(weights.config),
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_cache": True,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "bos_token_id": None,
        "torch_dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype],
        "lime_preset": weights.config.name,
        "transformers_version": transformers.__version__,
    }


def _write_tokenizer(tokenizer: Any, out: Path, max_length: int) -> None:
    """Tokenizer files + chat template (when the tokenizer has the chat tags) + pad/eos.

    `tokenizer` is load_model's: the chat tags are already there when SFT added them and the model
    has rows for them (checkpoint.loading.checkpoint_tokenizer).
    """
    tokenizer.save_hf(str(out))
    config_path = out / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    config.update({
        "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
        "pad_token": tokenizer.id_to_piece(tokenizer.pad_id),
        "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
        "model_max_length": max_length,
        # Without this, transformers 4.x fast tokenizers also return token_type_ids, which
        # generate() rejects for a model that has none.
        "model_input_names": ["input_ids", "attention_mask"],
    })
    if None not in (tokenizer.user_id, tokenizer.assistant_id, tokenizer.context_id):
        config["chat_template"] = CHAT_TEMPLATE
    write_json(config_path, config, sort_keys=False)


# What --overwrite may replace: a folder this tool wrote. A Hugging Face export or a consolidated
# checkpoint (--from-hf) is flat, holds model.safetensors and config.json or lime_config.json, and
# nothing but files with these suffixes (config, weights, remote code, card, tokenizer files).
EXPORT_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".model", ".txt", ".jinja")


def check_output_folder(output: str | Path, source: str | Path, overwrite: bool) -> None:
    """Refuse an --output that would destroy the input or anything this tool did not write (ValueError).

    The output may never be the --load folder, contain it, or lie inside it. An existing non-empty
    output is replaced only with `overwrite` and only when it is recognised as an export (see
    EXPORT_SUFFIXES); the replacement itself happens after the new folder is complete (atomic_directory).
    """
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source or output in source.parents or source in output.parents:
        relation = "is" if output == source else "contains" if output in source.parents else "is inside"
        raise LimeInputError(f"--output {output} {relation} the --load folder {source}: choose an output outside it")
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not overwrite:
        raise LimeInputError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    if not output.is_dir():
        raise LimeInputError(f"--output {output} is a file, not an export folder: not replacing it")
    entries = sorted(output.iterdir())
    unexpected = [p.name + ("/" if p.is_dir() else "") for p in entries
                  if p.is_dir() or not p.name.endswith(EXPORT_SUFFIXES)]
    names = {p.name for p in entries}
    if unexpected or CONSOLIDATED_WEIGHTS not in names or not names & {HF_CONFIG, LIME_CONFIG}:
        found = ", ".join(unexpected[:5]) if unexpected else \
            f"no {CONSOLIDATED_WEIGHTS} with {HF_CONFIG} or {LIME_CONFIG}"
        raise LimeInputError(f"--overwrite: {output} does not look like an export made by this tool ({found}); "
                             f"not deleting it: remove it yourself or choose another --output")


def export_to_hf(loaded: LoadedModel, output_dir: str | Path, dtype: str = "bf16") -> Path:
    """Write the Hugging Face folder for a model from checkpoint.load_model (see the module docstring).

    The folder is built in a temporary sibling directory and renamed into place when complete; every
    file is hashed right after it is written, and the hashes go into lime_run.json, written last.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    config, tokenizer = loaded.config, loaded.tokenizer
    with atomic_directory(output_dir) as tmp:
        logger.info("writing tokenizer files from %s", tokenizer.path)
        _write_tokenizer(tokenizer, tmp, config.max_position_embeddings)

        hf_state = lime_to_hf_state_dict(loaded.state_dict, config.num_layers)
        hf_state = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous() for name, t in hf_state.items()}
        logger.info("writing %s: %d tensors, %.1fM parameters, %s", CONSOLIDATED_WEIGHTS, len(hf_state),
                    sum(t.numel() for t in hf_state.values()) / 1e6, dtype)
        record = {CONSOLIDATED_WEIGHTS: write_safetensors(tmp / CONSOLIDATED_WEIGHTS, hf_state,
                                                           integrity.EXPORT_HASH_ALGORITHM)}

        write_json(tmp / HF_CONFIG, hf_config_dict(loaded, tokenizer.pad_id, tokenizer.eos_id, dtype),
                   sort_keys=False)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HF_FILES_DIR / name, tmp / name)

        from transformers import GenerationConfig

        generation = GenerationConfig(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                                      bos_token_id=None, **generation_defaults())
        generation.validate()
        generation.save_pretrained(str(tmp))

        write_text(tmp / "README.md",
                   render_model_card(loaded, tokenizer, dtype=dtype, supported_transformers=SUPPORTED_TRANSFORMERS))
        others = sorted(p for p in tmp.iterdir() if p.is_file() and p.name not in record)
        record.update(integrity.hash_files(tmp, others, integrity.EXPORT_HASH_ALGORITHM))
        write_json(tmp / EXPORT_RUN_FILE, {**loaded.metadata, "model": config.to_dict(), integrity.RECORD_KEY: record},
                   sort_keys=False)
    logger.info("exported %s to %s", loaded.source, output_dir)
    return output_dir


def import_from_hf(hf_dir: str | Path, output_dir: str | Path) -> LimeWeights:
    """Hugging Face LIME folder -> our consolidated format (fp32), ready for `--load DIR --finetune`.

    The run's record (lime_run.json in the export) is carried over; "tokenizer" points to the
    original tokenizer when the record names one that still exists, else to the export itself
    (whose tokenizer.json megatron_lime.tokenizer.load_tokenizer reads).
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / HF_CONFIG).is_file():
        raise LimeInputError(f"{hf_dir}: not a Hugging Face folder (no {HF_CONFIG})")
    weights = load_lime_weights(hf_dir)
    state_dict = {name: t.to(torch.float32) for name, t in weights.state_dict.items()}
    metadata = dict(weights.metadata)
    original_tokenizer = metadata.get("tokenizer")
    if not original_tokenizer or not Path(original_tokenizer).exists():
        metadata["tokenizer"] = str(hf_dir.absolute())
    metadata["converted_from_hf"] = str(hf_dir.absolute())
    write_consolidated(Path(output_dir), state_dict, metadata)
    logger.info("wrote consolidated checkpoint %s from %s", output_dir, hf_dir)
    return LimeWeights(state_dict, weights.config, metadata, "consolidated", f"consolidated checkpoint {output_dir}")
