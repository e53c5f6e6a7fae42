"""The LIME model: plain PyTorch (see lime.py)."""

from megatron_lime.model.lime import LimeBlock, LimeModel, LimeOutput, RMSNorm
from megatron_lime.model.loss import chunked_language_model_loss, language_model_loss
from megatron_lime.model.positions import sinusoid_table

__all__ = ["LimeBlock", "LimeModel", "LimeOutput", "RMSNorm", "chunked_language_model_loss", "language_model_loss",
           "sinusoid_table"]
