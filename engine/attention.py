"""The step's attention metadata and the one per-step global that carries it into the model.

The model runner builds an ``AttentionMetadata`` per step and enters ``forward_context`` around
the forward pass; each ``Attention`` layer reads it instead of receiving it through every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kernels import Ops


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one flat token batch (T tokens of B sequences).

    slot_mapping     [T]     flat cache slot of each new token (block_id * block_size + offset)
    query_start_loc  [B+1]   sequence b owns tokens query_start_loc[b] : query_start_loc[b+1]
    seq_lens         [B]     tokens in the cache for b once this step's are written
    block_tables     [B, M]  block ids of b, padded with 0 (never read past seq_lens)
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int


_CONTEXT: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, metadata
    try:
        yield
    finally:
        _CONTEXT = previous


def current_metadata() -> AttentionMetadata:
    if _CONTEXT is None:
        raise RuntimeError("attention ran outside forward_context()")
    return _CONTEXT


class Attention(nn.Module):
    """A block's attention up to its output projection: the pre-norm, the qkv projection, rotary, this
    step's K/V into the layer's cache blocks, then attention over the paged cache.

    ``k_cache``/``v_cache`` ([num_blocks, block_size, Hkv, D] views of the pool) are bound by
    the model runner once the KV pool exists.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops: Ops) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.ops = ops
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        norm: nn.Module,
        qkv_proj: nn.Module,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        cos_sin_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, H] -> (attention output [T, Hq * D], x + residual, the next residual).

        ``norm`` (RMSNorm, or LayerNorm with a ``bias``) and ``qkv_proj`` (weight [(Hq + 2 Hkv) D, H]) run in
        one op with the rotary of q and k (given ``positions`` [T] and a ``cos_sin_cache``) and the KV write
        (``Ops.norm_qkv_kv_write``: a single kernel for a decode step of one token).
        """
        md = current_metadata()
        q, h = self.ops.norm_qkv_kv_write(
            x, residual, norm.weight, getattr(norm, "bias", None), norm.eps, qkv_proj.weight, qkv_proj.bias,
            (self.num_heads, self.num_kv_heads, self.head_dim), positions, cos_sin_cache, self.k_cache,
            self.v_cache, md.slot_mapping,
        )
        out = self.ops.paged_attention(
            q, self.k_cache, self.v_cache, md.block_tables, md.query_start_loc, md.seq_lens, self.scale,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
        )
        return out.flatten(1), h
