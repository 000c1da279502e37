"""Rotary position embedding in transformers' rotate-half form, applied to q and k; optionally fused
with the KV-cache write of the rotated k and of v.

For a head x of ``head_dim`` features, the first ``rot_dim`` rotate and the rest pass through:

    x = [ a (rot_dim/2) | b (rot_dim/2) | pass (head_dim - rot_dim) ]
    a' = a * cos - b * sin        b' = b * cos + a * sin        (float32, rounded once)

with cos|sin = cos_sin_cache[position] ([max_pos, rot_dim] float32: cos in the first half).
A program takes BLOCK_T tokens (one at Llama-3-8B's shape) and all their heads, reading each cos|sin
row once.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.kv_write import check_kv_cache, copy_heads, kv_write_ref, load_slots
from kernels.rms_norm import (
    cdiv,
    jit_at_launch,
    next_power_of_2,
    pdl_meta,
    tile_elements,
    wait_for_producers,
    warps_for,
)

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch
TILE = 2048  # elements per half-head tile of a program on a GPU


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rot_dim`` features of every head; returns new (q, k), inputs untouched.

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


def rotary_kv_write_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """``rotary_ref`` then ``kv_write_ref`` of the rotated k and of v; returns the rotated q (a new tensor).

    Shapes as in both; q, k, v untouched. Tokens with a negative slot are rotated (q) but not cached.
    """
    q, k = rotary_ref(positions, q, k, cos_sin_cache)
    kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


@jit_at_launch
def _rotate_heads(src_ptr, dst_ptr, src_tok, dst_tok, tok_ok, src_stride_h, dst_stride_h, cos, sin,
                  N_HEADS: tl.constexpr, HALF: tl.constexpr, N_PASS: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotates [N_HEADS, head_dim] of each token of a tile from src to dst (the pass-through tail copied);
    src_tok/dst_tok are the tokens' element offsets ([BLOCK_T]), cos/sin [BLOCK_T, 1, BLOCK_HALF]."""
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    pcols = tl.arange(0, BLOCK_PASS)[None, None, :]
    for h0 in range(0, N_HEADS, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        row_ok = tok_ok[:, None, None] & (heads < N_HEADS)
        src = src_ptr + src_tok[:, None, None] + heads * src_stride_h
        dst = dst_ptr + dst_tok[:, None, None] + heads * dst_stride_h
        m = row_ok & (cols < HALF)
        a = tl.load(src + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(src + HALF + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dst + cols, (a * cos - b * sin).to(dst_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + cols, (b * cos + a * sin).to(dst_ptr.dtype.element_ty), mask=m)
        if N_PASS > 0:
            pm = row_ok & (pcols < N_PASS)
            x = tl.load(src + 2 * HALF + pcols, mask=pm)
            tl.store(dst + 2 * HALF + pcols, x.to(dst_ptr.dtype.element_ty), mask=pm)


@jit_at_launch
def _cos_sin(pos_ptr, cs_ptr, tok, tok_ok, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos, sin rows [BLOCK_T, 1, BLOCK_HALF] of the tokens' positions."""
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    row = cs_ptr + (tl.load(pos_ptr + tok, mask=tok_ok, other=0).to(tl.int64) * (2 * HALF))[:, None, None]
    m = tok_ok[:, None, None] & (cols < HALF)
    return tl.load(row + cols, mask=m, other=0.0), tl.load(row + HALF + cols, mask=m, other=0.0)


@jit_at_launch
def _rotary_kernel(
    pos_ptr, cs_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr,
    n_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    N_Q_HEADS: tl.constexpr, N_K_HEADS: tl.constexpr,  # fixed per model: static head loops, no recompiles
    HALF: tl.constexpr, N_PASS: tl.constexpr,  # rot_dim / 2 and head_dim - rot_dim fix the tile shapes
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producers(PDL)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < n_tokens
    cos, sin = _cos_sin(pos_ptr, cs_ptr, tok, ok, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, tok * stride_qt, tok * stride_qot, ok, stride_qh, stride_qoh,
                  cos, sin, N_Q_HEADS, HALF, N_PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(k_ptr, k_out_ptr, tok * stride_kt, tok * stride_kot, ok, stride_kh, stride_koh,
                  cos, sin, N_K_HEADS, HALF, N_PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with ``rotary_ref``'s contract: new contiguous (q, k); q, k may be strided views.
    ``pdl``: launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    meta = _tile_meta(q, k, cos_sin_cache)
    if q.shape[0] > 0:
        _rotary_kernel[(cdiv(q.shape[0], meta["BLOCK_T"]),)](
            positions.contiguous(), cos_sin_cache, q, k, q_out, k_out,
            q.shape[0],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            **meta, **pdl_meta(pdl, q.device),
        )
    return q_out, k_out


@jit_at_launch
def _rotary_kv_write_kernel(
    pos_ptr, cs_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    n_tokens, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    N_Q_HEADS: tl.constexpr, N_K_HEADS: tl.constexpr,  # fixed per model: static head loops, no recompiles
    HALF: tl.constexpr, N_PASS: tl.constexpr,  # rot_dim / 2 and head_dim - rot_dim fix the tile shapes
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producers(PDL)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < n_tokens
    cos, sin = _cos_sin(pos_ptr, cs_ptr, tok, ok, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, tok * stride_qt, tok * stride_qot, ok, stride_qh, stride_qoh,
                  cos, sin, N_Q_HEADS, HALF, N_PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    slot, keep = load_slots(slot_ptr, tok, ok)
    blk, off = slot // block_size, slot % block_size
    _rotate_heads(k_ptr, k_cache_ptr, tok * stride_kt, blk * stride_kcb + off * stride_kco, keep,
                  stride_kh, stride_kch, cos, sin, N_K_HEADS, HALF, N_PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)
    copy_heads(v_ptr, v_cache_ptr, tok * stride_vt, blk * stride_vcb + off * stride_vco, keep,
               stride_vh, stride_vch, N_K_HEADS, 2 * HALF + N_PASS, BLOCK_HK, BLOCK_D)


def rotary_kv_write(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """Triton launcher with ``rotary_kv_write_ref``'s contract; the rotated k never exists outside the cache.
    ``pdl`` as in ``rotary``."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    check_kv_cache(k_cache, v_cache, *k.shape[1:])
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    meta = _tile_meta(q, k, cos_sin_cache)
    if q.shape[0] > 0:
        _rotary_kv_write_kernel[(cdiv(q.shape[0], meta["BLOCK_T"]),)](
            positions.contiguous(), cos_sin_cache, slot_mapping.contiguous(), q, k, v, q_out, k_cache, v_cache,
            q.shape[0], k_cache.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_D=next_power_of_2(q.shape[2]), **meta, **pdl_meta(pdl, q.device),
        )
    return q_out


def _tile_meta(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> dict[str, int]:
    """Constexprs: the rotary split of head_dim, and BLOCK_T tokens x BLOCK_H heads x BLOCK_HALF tiles of
    about TILE elements (Llama-3-8B: one token's 32 q heads x 64), so small heads batch several tokens."""
    rot_dim, head_dim = cos_sin_cache.shape[-1], q.shape[-1]
    if rot_dim % 2 or rot_dim > head_dim or k.shape[-1] != head_dim:
        raise ValueError(f"rotary needs an even rot_dim <= head_dim; got rot_dim {rot_dim}, head_dim {head_dim}")
    if cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache must be a contiguous float32 [max_pos, rot_dim] tensor")
    block_half, elements = next_power_of_2(rot_dim // 2), tile_elements(TILE, q.device)
    heads = lambda n: max(1, min(next_power_of_2(n), elements // block_half))
    return {
        "N_Q_HEADS": q.shape[1],
        "N_K_HEADS": k.shape[1],
        "HALF": rot_dim // 2,
        "N_PASS": head_dim - rot_dim,
        "BLOCK_T": max(1, elements // (heads(q.shape[1]) * block_half)),
        "BLOCK_HQ": heads(q.shape[1]),
        "BLOCK_HK": heads(k.shape[1]),
        "BLOCK_HALF": block_half,
        "BLOCK_PASS": next_power_of_2(max(head_dim - rot_dim, 1)),
        "num_warps": warps_for(TILE),
    }


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
