"""Files copied verbatim into every Hugging Face export (configuration_lime.py, modeling_lime.py, integrity_lime.py).

They import only torch and transformers; this package marker only lets megatron_lime's own
tests import them directly. It is not copied into exports.
"""
