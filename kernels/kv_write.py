"""Writes the step's new K and V into their slots of the paged KV cache.

    k_cache[num_blocks, block_size, Hkv, D]         slot s = block_id * block_size + offset
      block 0: [ slot 0 | slot 1 | ... | slot bs-1 ]
      block 1: [ slot bs | ...                     ]

Token t's [Hkv, D] k and v rows go to slot ``slot_mapping[t]``; a negative slot is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

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
TILE = 2048  # elements per program on a GPU


def kv_write_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int.

    Token t goes to flat slot ``slot_mapping[t]`` = block_id * block_size + offset. A negative
    slot marks a padding token (CUDA-graph padding) and is skipped.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // k_cache.shape[1], slots % k_cache.shape[1]
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


@jit_at_launch
def copy_heads(src_ptr, dst_ptr, src_tok, dst_tok, tok_ok, src_stride_h, dst_stride_h,
               N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copies [N_HEADS, HEAD_DIM] of each token of a tile, cast to dst's dtype; src_tok/dst_tok are the
    tokens' element offsets ([BLOCK_T]); tokens with tok_ok false are neither read nor written."""
    cols = tl.arange(0, BLOCK_D)[None, None, :]
    for h0 in range(0, N_HEADS, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        m = tok_ok[:, None, None] & (heads < N_HEADS) & (cols < HEAD_DIM)
        x = tl.load(src_ptr + src_tok[:, None, None] + heads * src_stride_h + cols, mask=m)
        tl.store(dst_ptr + dst_tok[:, None, None] + heads * dst_stride_h + cols, x.to(dst_ptr.dtype.element_ty), mask=m)


@jit_at_launch
def load_slots(slot_ptr, tok, tok_ok):
    """(cache slot of each token, clamped to >= 0; write mask: a padding token's negative slot writes nothing)."""
    slot = tl.load(slot_ptr + tok, mask=tok_ok, other=-1).to(tl.int64)
    return tl.maximum(slot, 0), tok_ok & (slot >= 0)


@jit_at_launch
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    n_tokens, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,  # fixed per model: static head loops, no recompiles
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producers(PDL)
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot, keep = load_slots(slot_ptr, tok, tok < n_tokens)
    blk, off = slot // block_size, slot % block_size
    copy_heads(k_ptr, k_cache_ptr, tok * stride_kt, blk * stride_kcb + off * stride_kco, keep,
               stride_kh, stride_kch, N_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)
    copy_heads(v_ptr, v_cache_ptr, tok * stride_vt, blk * stride_vcb + off * stride_vco, keep,
               stride_vh, stride_vch, N_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    pdl: bool = False,
) -> None:
    """Triton launcher with ``kv_write_ref``'s contract; k and v may be strided views (e.g. of a fused qkv).
    ``pdl``: launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    check_kv_cache(k_cache, v_cache, *k.shape[1:])
    n_tokens, n_heads, head_dim = k.shape
    tile = heads_tile(n_heads, head_dim, tile_elements(TILE, k.device))
    if n_tokens > 0:
        _kv_write_kernel[(cdiv(n_tokens, tile["BLOCK_T"]),)](
            k, v, k_cache, v_cache, slot_mapping.contiguous(),
            n_tokens, k_cache.shape[1],
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            N_HEADS=n_heads, HEAD_DIM=head_dim, **tile, num_warps=warps_for(TILE), **pdl_meta(pdl, k.device),
        )


def heads_tile(n_heads: int, head_dim: int, elements: int) -> dict[str, int]:
    """A BLOCK_T x BLOCK_H x BLOCK_D tile of about ``elements``: all heads of one token where they fit
    (Llama-3-8B's 8 kv heads x 128: two tokens), several tokens where heads are few and small."""
    block_d = next_power_of_2(head_dim)
    block_h = max(1, min(next_power_of_2(n_heads), elements // block_d))
    return {"BLOCK_T": max(1, elements // (block_h * block_d)), "BLOCK_H": block_h, "BLOCK_D": block_d}


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    for cache in (k_cache, v_cache):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (num_kv_heads, head_dim) or cache.stride(-1) != 1:
            raise ValueError(f"KV cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}] "
                             f"with unit stride in head_dim; got {tuple(cache.shape)}")
