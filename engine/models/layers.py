"""Building blocks shared by the model families: norms, rotary embedding, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.parallel import ColumnParallelLinear, RowParallelLinear
from kernels import Ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """With ``residual``: returns (norm(x + residual), x + residual)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps, residual)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, ops: Ops) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], bias, ops)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, ops)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.gate_up_proj
        return self.down_proj(self.ops.linear_act(x, up.weight, up.bias, "silu_and_mul"))


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Rotary settings from either transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
        params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0), **scaling}
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rot_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies [rot_dim / 2], with the scaling of ``params['rope_type']`` applied."""
    kind = params["rope_type"]
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim)
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        return _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rule: long wavelengths slowed by ``factor``, short kept, the middle blended."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the [max_pos, rot_dim] cos|sin table the qkv projection rotates q and k with (``Attention``)."""

    def __init__(self, rot_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(rot_dim, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)
