"""Rotary position embedding in transformers' rotate-half form, applied to q and k."""

from __future__ import annotations

import torch


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rot_dim`` features of every head.

    positions: [T] int; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin_cache: [max_pos, rot_dim] float32,
    holding cos(pos * inv_freq) in the first rot_dim/2 columns and sin in the rest.
    x_rot = x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a].
    """
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    return _apply(q, cos, sin, rot_dim), _apply(k, cos, sin, rot_dim)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    a, b = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat((-b, a), dim=-1)
    out = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.numel() else out
