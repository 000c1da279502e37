"""Dense linear layer: y = x W^T + b (cuBLAS through torch), and the linear followed by the MLP's activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.activation import gelu_ref, silu_and_mul_ref

# silu_and_mul: the gated MLP's [gate | up] product -> silu(gate) * up; gelu_tanh / gelu_erf: GELU's two forms
ACTIVATIONS = ("silu_and_mul", "gelu_tanh", "gelu_erf")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in]; weight: [out, in] as transformers stores nn.Linear weights."""
    return F.linear(x, weight, bias)


def linear_act_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """activation(x W^T + b), ``activation`` one of ACTIVATIONS; [T, out] -> [T, out / 2] for silu_and_mul."""
    check_activation(activation)
    y = linear_ref(x, weight, bias)
    if activation == "silu_and_mul":
        return silu_and_mul_ref(y)
    return gelu_ref(y, "tanh" if activation == "gelu_tanh" else "none")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
