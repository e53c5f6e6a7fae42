"""The compiled data helpers (csrc/data/helpers.cpp, built as megatron_lime._data_helpers).

Sample and blending index builders (gpt_dataset.py, builder.py) and pack_documents (preprocess.py).
Plain pybind11 without libtorch, so importing them does not import torch.
"""

from __future__ import annotations

_helpers = None


def data_helpers():
    """The compiled module, with a clear message when it is not built."""
    global _helpers
    if _helpers is None:
        try:
            from megatron_lime import _data_helpers
        except ImportError as e:
            raise ImportError(
                "megatron_lime._data_helpers is not built; run "
                "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
                f"in the megatron-lime checkout ({e})"
            ) from e
        _helpers = _data_helpers
    return _helpers
