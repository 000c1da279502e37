"""LayerNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = (x - mean) / sqrt(var + eps) * w + b; with ``residual`` adds it first and returns (y, x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, residual)
