"""Activations of the MLP: SiLU-and-mul (gated MLPs) and GELU (tanh or exact)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU; ``approximate`` is "tanh" (GPT-2's gelu_new) or "none" (exact erf form)."""
    return F.gelu(x, approximate=approximate)
