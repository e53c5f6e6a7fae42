"""The compiled C++ helpers (csrc/data/helpers.cpp, built as megatron_lime._data_helpers), loaded once.

One extension serves two packages, so its loader sits on the ground floor: the data package's sample and
blending index builders (gpt_dataset.py, builder.py) and pack_documents (preprocess.py), and the tokenizer's
WordRouter and charsmap rules (tokenizer/agreement.py). Plain pybind11 without libtorch, so importing it does
not import torch.
"""

from __future__ import annotations

import importlib

_helpers = None


def compiled_helpers():
    """The compiled module, with a clear message when it is not built."""
    global _helpers
    if _helpers is None:
        try:
            # By its full name: `from megatron_lime import ...` would run the package's __init__ (the public API).
            _data_helpers = importlib.import_module("megatron_lime._data_helpers")
        except ImportError as e:
            raise ImportError(
                "megatron_lime._data_helpers is not built; run "
                "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
                f"in the megatron-lime checkout ({e})"
            ) from e
        _helpers = _data_helpers
    return _helpers
