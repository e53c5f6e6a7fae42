"""load_model(path): the model, its config and its tokenizer from any checkpoint layout (verified first).

Evaluation (evaluation/lm.py), generation (conversion/generation.py) and the exporter
(tools/convert_to_hf.py) all load through it, so "which tokenizer goes with these weights" is
decided here only: the one named with `tokenizer=`, else the one the checkpoint records
(lime_config.json's "tokenizer"; an export carries its own), with the chat tags added as SFT added
them when the model has rows for them (LimeTokenizer.with_chat_tokens).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_lime.checkpoint.weights import LimeWeights, load_lime_weights
from megatron_lime.config import LimeConfig
from megatron_lime.errors import LimeInputError, MissingInputError
from megatron_lime.model import LimeModel
from megatron_lime.tokenizer import describe_added_chat_tokens, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A LimeModel in eval mode, the config it was built from, the tokenizer it was trained with, the run's record."""

    model: Any  # megatron_lime.model.LimeModel
    config: LimeConfig
    tokenizer: Any  # megatron_lime.tokenizer.LimeTokenizer
    metadata: dict[str, Any]  # the run's record (lime_config.json / lime_run.json, without "files")
    kind: str  # "deepspeed", "consolidated" or "hf"
    source: str  # one line: where the weights came from

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights with megatron_lime names (tensors shared with the model)."""
        return self.model.state_dict()


def checkpoint_tokenizer(weights: LimeWeights, path: str, tokenizer_path: str | None) -> Any:
    """The tokenizer that goes with `weights` (see the module docstring); errors name what to pass instead."""
    tokenizer_path = tokenizer_path or (path if weights.kind == "hf" else weights.metadata.get("tokenizer"))
    if not tokenizer_path:
        raise LimeInputError(f"{path}: the checkpoint does not record its tokenizer; pass --tokenizer DIR")
    if not os.path.exists(tokenizer_path):
        raise MissingInputError(f"{path} names tokenizer {tokenizer_path}, which does not exist; pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_path)
    rows = weights.config.vocab_size
    if tokenizer.vocab_size > rows:
        raise LimeInputError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but the model only {rows} "
                             f"embedding rows: wrong tokenizer for this checkpoint")
    with_chat = tokenizer.with_chat_tokens()
    if with_chat.vocab_size <= rows:
        tokenizer = with_chat
        if describe_added_chat_tokens(tokenizer):
            logger.info("%s", describe_added_chat_tokens(tokenizer))
    else:
        logger.warning("tokenizer %s lacks %s and the model has no rows for them: no chat template",
                       tokenizer_path, ", ".join(with_chat.added_chat_tokens))
    if tokenizer.vocab_size < rows:
        logger.info("tokenizer has %d ids, the model %d embedding rows (the extra rows are never produced "
                    "by the tokenizer)", tokenizer.vocab_size, rows)
    return tokenizer


def load_model(path: str | os.PathLike, tag: str | None = None, tokenizer: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Model, config and tokenizer from a DeepSpeed save dir (any data-parallel size; `tag` or `latest`), a
    consolidated folder or a Hugging Face export. `dtype` None keeps the stored dtype (fp32 master weights
    of a DeepSpeed save); the sinusoid position table is always computed in fp32, as in training."""
    path = str(path)
    weights = load_lime_weights(path, tag=tag)
    lime_tokenizer = checkpoint_tokenizer(weights, path, tokenizer)
    model = LimeModel.from_weights(weights.state_dict, weights.config, path, device=device, dtype=dtype)
    return LoadedModel(model, weights.config, lime_tokenizer, weights.metadata, weights.kind, weights.source)
