"""megatron-lime: pretraining, instruction tuning and export of the LIME model family.

    from megatron_lime import LimeConfig, LimeModel
    model = LimeModel(LimeConfig.from_name("lime-125m"))
"""

from megatron_lime.config import PRESETS, LimeConfig

__version__ = "0.1.0"

__all__ = ["LimeConfig", "LimeModel", "PRESETS", "__version__"]


def __getattr__(name: str):
    # The model pulls in torch and the compiled kernels: import it on first use, so that
    # `import megatron_lime.config` (flag parsing, tools that only read configs) stays light.
    if name == "LimeModel":
        from megatron_lime.model import LimeModel

        return LimeModel
    raise AttributeError(f"module 'megatron_lime' has no attribute {name!r}")
