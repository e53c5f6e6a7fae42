"""OpLog: the ops a piece of code runs below autograd (the kernels a step would launch), for tests that count them."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """`with OpLog() as log: ...`; log.ops is [(op name such as "aten.mm" or "lime.silu_fwd", output shape or None)],
    in the order they ran."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func.overloadpacket), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out
