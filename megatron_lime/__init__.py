"""megatron-lime: pretraining, instruction tuning and export of the LIME model family."""

from megatron_lime.config import PRESETS, LimeConfig

__version__ = "0.1.0"

__all__ = ["LimeConfig", "PRESETS", "__version__"]
