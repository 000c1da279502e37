"""The attention block's entry: the fused q|k|v projection, rotary on q and k, and the KV-cache write.

    qkv = x W^T + b           W = [q (Hq heads) | k (Hkv) | v (Hkv)] rows of head_dim each
    q, k = rotary(q, k)       (with a cos|sin table; GPT-2 has none)
    cache[slot] <- k, v       returns q [T, Hq, D]

``qkv_kv_write_ref`` composes the references. ``qkv_kv_write`` runs a one-row x (a batch-1 decode step) as
one launch: the one-row GEMV (``kernels.gemv.row_dots``) whose epilogue rotates and stores. A program owns
BLOCK_P rotary pairs, features (i, i + D/2) of one head: its tile rows 2j and 2j + 1 are the two rows of
pair j, so a split of the products gives both halves of the rotation. q goes to memory; k and v go straight
into the cache, never to a [T, 3, H, D] intermediate, and neither the rotary nor the KV write is a launch of
its own. The products are rounded to x's dtype before the rotation, as the separate kernels see them. More
rows (prefill, batched decode), or a partial rotary, run cuBLAS and then the rotary/KV-write kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.gemv import is_one_row, linear, row_dots
from kernels.kv_write import check_kv_cache, kv_write, kv_write_ref
from kernels.linear import linear_ref
from kernels.rms_norm import cdiv, jit_at_launch, next_power_of_2, pdl_meta
from kernels.rotary import rotary_kv_write, rotary_kv_write_ref

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch


def split_heads(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q [T, Hq, D], k and v [T, Hkv, D] of a fused [T, (Hq + 2 Hkv) D] projection."""
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)


def qkv_kv_write_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, num_kv_heads: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    positions: torch.Tensor | None = None, cos_sin_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, hidden] -> q [T, Hq, D]; the new k and v go to their cache slots (``kernels.kv_write``). With a
    ``cos_sin_cache`` ([max_pos, rot_dim], ``kernels.rotary``) q and k are rotated at ``positions`` first."""
    q, k, v = split_heads(linear_ref(x, weight, bias), num_heads, num_kv_heads, k_cache.shape[-1])
    if cos_sin_cache is None:
        kv_write_ref(k, v, k_cache, v_cache, slot_mapping)
        return q
    return rotary_kv_write_ref(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)


@jit_at_launch
def _qkv_gemv_kernel(
    x_ptr, w_ptr, b_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cs_ptr,
    n_in, stride_w, block_size, stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    N_Q_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HALF: tl.constexpr,  # HALF = head_dim / 2
    HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    r = tl.arange(0, 2 * BLOCK_P)
    pair = tl.program_id(0) * BLOCK_P + r // 2
    head, feature = pair // HALF, pair % HALF + (r % 2) * HALF  # head over q | k | v, feature within the head
    rows = head * (2 * HALF) + feature
    row_ok = head < N_Q_HEADS + 2 * N_KV_HEADS
    y = row_dots(x_ptr, w_ptr + rows.to(tl.int64) * stride_w, row_ok, n_in, BLOCK_K, PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(q_ptr.dtype.element_ty).to(tl.float32)
    if ROTARY:  # pairs of q and k heads turn by their angle; v's get cos 1, sin 0 and stay as they are
        pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        turns = pairs // HALF < N_Q_HEADS + N_KV_HEADS
        angle = cs_ptr + tl.load(pos_ptr + 0 * pairs).to(tl.int64) * (2 * HALF) + pairs % HALF
        cos = tl.load(angle, mask=turns, other=1.0)
        sin = tl.load(angle + HALF, mask=turns, other=0.0)
        a, b = tl.split(tl.reshape(y, [BLOCK_P, 2]))
        y = tl.reshape(tl.join(a * cos - b * sin, b * cos + a * sin), [2 * BLOCK_P])
    tl.store(q_ptr + rows, y.to(q_ptr.dtype.element_ty), mask=row_ok & (head < N_Q_HEADS))
    slot = tl.load(slot_ptr + 0 * r).to(tl.int64)  # the one token's, for every row
    keep = row_ok & (slot >= 0)  # a negative slot: a padding token, cached nowhere
    kv_head = head - N_Q_HEADS
    blk, off = tl.maximum(slot, 0) // block_size, tl.maximum(slot, 0) % block_size
    k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kco + kv_head * stride_kch + feature
    tl.store(k_dst, y.to(k_cache_ptr.dtype.element_ty), mask=keep & (kv_head >= 0) & (kv_head < N_KV_HEADS))
    v_head = kv_head - N_KV_HEADS
    v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vco + v_head * stride_vch + feature
    tl.store(v_dst, y.to(v_cache_ptr.dtype.element_ty), mask=keep & (v_head >= 0))


def qkv_kv_write(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, num_kv_heads: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    positions: torch.Tensor | None = None, cos_sin_cache: torch.Tensor | None = None, *,
    block_pairs: int = 1, block_k: int | None = None, num_warps: int = 4, pdl: bool = False,
) -> torch.Tensor:
    """``qkv_kv_write_ref``'s contract. ``block_pairs``: rotary pairs a program owns (a power of two; 1 reads
    2 x BLOCK_K weights, ``kernels.gemv``'s tile). ``pdl``: programmatic dependent launch."""
    head_dim = k_cache.shape[-1]
    if weight.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv weight has {weight.shape[0]} rows; {num_heads} + 2 x {num_kv_heads} heads of "
                         f"{head_dim} need {(num_heads + 2 * num_kv_heads) * head_dim}")
    rotary = cos_sin_cache is not None
    if not is_one_row(x) or head_dim % 2 or (rotary and cos_sin_cache.shape[-1] != head_dim):
        q, k, v = split_heads(linear(x, weight, bias, pdl=pdl), num_heads, num_kv_heads, head_dim)
        if not rotary:
            kv_write(k, v, k_cache, v_cache, slot_mapping, pdl=pdl)
            return q
        return rotary_kv_write(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, pdl=pdl)
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"qkv takes x [1, {weight.shape[1]}], got {list(x.shape)}")
    if rotary and (positions is None or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()):
        raise ValueError("rotary needs positions and a contiguous float32 cos_sin_cache [max_pos, head_dim]")
    if block_pairs < 1 or block_pairs & (block_pairs - 1):
        raise ValueError(f"block_pairs must be a power of two, got {block_pairs}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    pairs = weight.shape[0] // 2
    _qkv_gemv_kernel[(cdiv(pairs, block_pairs),)](
        x, weight, bias if bias is not None else weight, q, k_cache, v_cache, slot_mapping,
        positions if rotary else slot_mapping, cos_sin_cache if rotary else weight,
        x.shape[1], weight.stride(0), k_cache.shape[1],
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        N_Q_HEADS=num_heads, N_KV_HEADS=num_kv_heads, HALF=head_dim // 2, HAS_BIAS=bias is not None, ROTARY=rotary,
        BLOCK_P=block_pairs, BLOCK_K=block_k or min(2048, next_power_of_2(x.shape[1])), num_warps=num_warps,
        **pdl_meta(pdl, x.device),
    )
    return q
