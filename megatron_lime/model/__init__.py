"""The LIME model in plain PyTorch: nothing of DeepSpeed, checkpoints or data. Layer 2 of the package
(ARCHITECTURE.md): it imports only the kernels and the ground floor.

    lime.py        LimeModel: blocks, forward, initialisation, and its own weights (checked_weights, load_weights,
                   from_weights: which tensors are weights, and the position table that is computed, not stored)
    attention.py   causal self-attention (SDPA, flex, flash-attn), document masks for packed sequences
    linear.py      Linear layers whose GEMM accumulates the weight gradient; the GEMM helpers
    loss.py        the chunked (fused on CUDA) cross-entropy over the tied output head
    positions.py   the sinusoid table
"""

from megatron_lime.model.lime import LimeBlock, LimeModel, LimeOutput, RMSNorm
from megatron_lime.model.loss import chunked_language_model_loss, language_model_loss
from megatron_lime.model.positions import sinusoid_table

__all__ = ["LimeBlock", "LimeModel", "LimeOutput", "RMSNorm", "chunked_language_model_loss", "language_model_loss",
           "sinusoid_table"]
