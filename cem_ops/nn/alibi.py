"""The standard geometric ALiBi slopes (Press et al., 2022)."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """m_k = 2^(-8k/n) for k = 1..n with n = num_heads when it is a power of two; otherwise the
    slopes of the closest smaller power of two followed by every other slope of twice that."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(base)
    if base < num_heads:
        slopes += geometric(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)
