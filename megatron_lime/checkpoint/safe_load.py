"""Reading .pt and .safetensors files without running pickled code.

Every `.pt` file is read with `torch.load(weights_only=True)`, which executes no pickled code; the
only classes allowed besides tensors and containers are the three DeepSpeed types its ZeRO optimizer
shards hold (deepspeed_safe_globals(); `getattr`, with which some Python 3.11 releases pickle an enum
member, is mapped to a lookup of those enums' members only), and numpy arrays in the RNG files of
checkpoints written before RNG states were tensors. DeepSpeed's own readers (engine.load_checkpoint,
zero_to_fp32, the universal-checkpoint loader) call `torch.load(..., weights_only=False)` themselves,
so they are run inside `deepspeed_loads_safely()`, the one place that redirects them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from typing import Any, Iterator, Sequence

import torch

from megatron_lime.checkpoint.format import CheckpointError, first_line


class UnsafeFileError(CheckpointError):
    """A file refused because loading it could run code (its message says what it holds)."""


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes a DeepSpeed ZeRO stage 0-2 checkpoint holds (fp32 and bf16), and nothing else.

    Found by loading real shards with weights_only=True: the optimizer shards pickle the loss scaler,
    the ZeRO stage enum and the fragment addresses of the flat partitions.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Some Python 3.11 releases (3.11.2 here) pickle an enum member as getattr(EnumClass, "name"): `getattr`
    # maps to a function that only looks up members of these enums, never a general getattr.
    allowed_enums = (ZeroStageEnum,)

    def enum_member(enum_class: Any, name: str) -> Any:
        if enum_class not in allowed_enums:
            raise pickle.UnpicklingError(f"GLOBAL builtins.getattr on {enum_class!r} (only enum members of "
                                         f"{', '.join(e.__name__ for e in allowed_enums)} are allowed)")
        return enum_class[name]

    return [LossScaler, ZeroStageEnum, fragment_address, (enum_member, "builtins.getattr")]


def numpy_array_safe_globals() -> list[Any]:
    """What a numpy array pickles as: allowed only for the RNG files written before RNG states were tensors.

    Safe to allow: an array's items that are Python objects are unpickled through the same checks.
    Both module names, because numpy 1 wrote `numpy.core` where numpy 2 has `numpy._core`.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_torch_load = torch.load  # the real one, also while deepspeed_loads_safely() has replaced torch.load


def torch_load(path: str | os.PathLike, map_location: Any = "cpu", allow: Sequence[Any] = (), **kwargs: Any) -> Any:
    """torch.load with weights_only=True and the DeepSpeed allowlist (plus `allow`); a refused or corrupt file is a
    CheckpointError."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals([*deepspeed_safe_globals(), *allow]):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
        if found:
            held = found.group(1) or found.group(2)
            raise UnsafeFileError(f"{path}: refused to load: it holds {held}, which is not a tensor, a container or "
                                  f"an allowed DeepSpeed type (loading it could run code)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first_line(err)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first_line(err)})") from None


@contextlib.contextmanager
def deepspeed_loads_safely() -> Iterator[None]:
    """Within this block every torch.load is `torch_load` (weights_only=True, the allowlist).

    Why a patch: DeepSpeed's checkpoint readers (engine.load_checkpoint through its checkpoint
    engine, the ZeRO universal loader, deepspeed.utils.zero_to_fp32) pass weights_only=False to
    torch.load themselves and take no loader argument. Replacing torch.load for the duration of
    the load is the one place that covers all of them; the block is entered only around those
    calls, in one thread.
    """
    def safe_load(f, map_location=None, *args, **kwargs):
        if args:  # pickle_module positionally: never used by DeepSpeed, refuse rather than guess
            raise TypeError("torch.load: pass options by keyword inside deepspeed_loads_safely()")
        kwargs.pop("pickle_module", None)
        return torch_load(f, map_location=map_location, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _torch_load


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a damaged file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
