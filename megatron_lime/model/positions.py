"""Sinusoidal position encoding (Vaswani et al., 2017), computed, never learned."""

from __future__ import annotations

import torch


def sinusoid_table(num_positions: int, hidden_size: int, base: float = 10_000.0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The table PE of shape (num_positions, hidden_size), float32.

    PE[p, 2i] = sin(p * w_i) and PE[p, 2i + 1] = cos(p * w_i), with w_i = base^(-2i / d).
    Computed in float64 so every position below num_positions is exact to float32 rounding.
    """
    positions = torch.arange(num_positions, dtype=torch.float64, device=device)  # (p,)
    pair_index = torch.arange(0, hidden_size, 2, dtype=torch.float64, device=device)  # (d/2,)
    frequencies = torch.pow(base, -pair_index / hidden_size)  # (d/2,)
    angles = positions[:, None] * frequencies[None, :]  # (p, d/2)
    table = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (p, d/2, 2)
    return table.reshape(num_positions, hidden_size).to(torch.float32)  # (p, d), sin/cos interleaved
