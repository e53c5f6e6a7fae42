"""Model configuration: one typed dataclass and the named presets.

`LimeConfig` is the single source of truth for the architecture. Command-line flags
(`--num-layers`, `--hidden-size`, ...) are generated from it by `megatron_lime.arguments`,
and the Hugging Face export writes the same fields into config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def param(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description; the description becomes the flag's help."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(kw_only=True)
class LimeConfig:
    """Architecture of a LIME model (decoder-only Transformer, sinusoidal positions, RMSNorm)."""

    name: str = param("custom", "Preset this configuration came from (informational).", flag=False)
    num_layers: int = param(32, "Number of Transformer blocks.")
    hidden_size: int = param(1536, "Model width d_model.")
    num_attention_heads: int = param(24, "Attention heads; hidden_size must divide by it.")
    ffn_hidden_size: int = param(6144, "Width of the MLP's hidden layer (non-gated SiLU).")
    vocab_size: int = param(50_000, "Vocabulary size (rows of the tied embedding).")
    max_position_embeddings: int = param(512, "Longest sequence the sinusoidal table covers.")
    norm_eps: float = param(1e-5, "Epsilon of every RMSNorm.")
    init_std: float = param(
        0.02, "Std of the normal initialisation (residual projections get std / sqrt(2 * num_layers)).")
    position_base: float = param(
        10_000.0, "Base of the sinusoidal position frequencies (10,000 as in Vaswani et al.).", flag=False)
    attention_backend: Literal["auto", "flash", "flex", "sdpa"] = param(
        "auto", "Attention: auto = flash-attn on CUDA when installed, else FlexAttention for packed batches "
        "on CUDA and SDPA otherwise; or force one."
    )
    loss_chunk_size: int = param(
        1024, "Tokens per chunk of the cross-entropy over the tied head (never all logits at once); 0 materialises "
        "the logits of the whole micro-batch."
    )

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                  "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim ({self.head_dim}) must be even")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be even for sinusoidal positions")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("norm_eps and init_std must be positive")
        if self.attention_backend not in ("auto", "flash", "flex", "sdpa"):
            raise ValueError(f"attention_backend must be auto, flash, flex or sdpa, got {self.attention_backend!r}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be 0 (off) or positive, got {self.loss_chunk_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LimeConfig":
        """The named preset, with any field overridden: `LimeConfig.from_name("lime-1b", num_layers=4)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LimeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def num_parameters(self) -> int:
        """Exact parameter count (tied embedding counted once, no biases)."""
        d, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        per_layer = 3 * d * d + d * d + 2 * d * f + 2 * d  # qkv, out, fc_in + fc_out, two norms
        return self.vocab_size * d + layers * per_layer + d

    def flops_per_token(self, seq_length: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls with weights plus 12*L*d*s for attention.

        N excludes the embedding lookup but includes the tied output head, which is a matmul.
        """
        s = seq_length or self.max_position_embeddings
        n_matmul = self.num_parameters() - (2 * self.num_layers + 1) * self.hidden_size
        return 6.0 * n_matmul + 12.0 * self.num_layers * self.hidden_size * s


# Named presets. `lime-1b` is the model card's model; `lime-tiny` is for tests;
# `lime-125m` fits single-GPU experiments; `lime-mini` is the CPU quickstart's model.
PRESETS: dict[str, dict[str, Any]] = {
    "lime-1b": dict(
        num_layers=32, hidden_size=1536, num_attention_heads=24, ffn_hidden_size=6144,
        vocab_size=50_000, max_position_embeddings=512,
    ),
    "lime-125m": dict(
        num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072,
        vocab_size=50_000, max_position_embeddings=512,
    ),
    "lime-mini": dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
        vocab_size=4_096, max_position_embeddings=256,
    ),
    "lime-tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
        vocab_size=512, max_position_embeddings=128,
    ),
}

