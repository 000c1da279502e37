"""Dense linear layer: y = x W^T + b (cuBLAS through torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in]; weight: [out, in] as transformers stores nn.Linear weights."""
    return F.linear(x, weight, bias)
