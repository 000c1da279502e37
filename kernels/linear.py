"""Dense linear layer: y = x W^T + b (cuBLAS through torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation import activation_ref


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in]; weight: [out, in] as transformers stores nn.Linear weights."""
    return F.linear(x, weight, bias)


def act_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """linear(activation(x)): an MLP's second product with its activation (kernels.activation.ACTIVATIONS)
    in front; for "silu_and_mul" x is [T, 2 * in] ([gate | up])."""
    return linear_ref(activation_ref(x, act), weight, bias)
