"""Hugging Face configuration of LIME models (shipped inside every export, loaded with trust_remote_code=True).

Standalone: imports only transformers. Field names follow the transformers conventions
(`num_hidden_layers`, `intermediate_size`, `rms_norm_eps`, ...); megatron_lime's
conversion table maps them to and from megatron_lime's own LimeConfig.

Supported transformers versions: 4.56 to 5.24 (tested with the one named in the export's README).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class LimeConfig(PretrainedConfig):
    """Decoder-only Transformer with sinusoidal positions, RMSNorm, a non-gated SiLU MLP and tied embeddings."""

    model_type = "lime"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50_000,
        hidden_size: int = 1536,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 24,
        intermediate_size: int = 6144,
        max_position_embeddings: int = 512,
        rms_norm_eps: float = 1e-5,
        position_base: float = 10_000.0,
        initializer_range: float = 0.02,
        hidden_act: str = "silu",
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                             f"({num_attention_heads})")
        if hidden_act != "silu":
            raise ValueError(f"LIME uses a SiLU MLP; hidden_act={hidden_act!r} is not supported")
        if not tie_word_embeddings:
            raise ValueError("LIME ties the output head to the token embedding; tie_word_embeddings must be true")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # No grouped-query attention: every head has its own keys and values. Stated for tools
        # (cache sizing, serving engines) that read num_key_value_heads / head_dim.
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.position_base = position_base
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        # Set before and after the base __init__: transformers 4.x takes these as arguments,
        # 5.x stores unknown keyword arguments as attributes.
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
