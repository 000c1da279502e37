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

from engine.parallel import ColumnParallelLinear
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
    """Projects q|k|v, writes the step's K/V into the layer's cache blocks (rotated, with a rotary table),
    then attends over the paged cache; the projection, rotary and KV write are one op (``Ops.qkv_kv_write``:
    one launch at batch 1).

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
        x: torch.Tensor,
        qkv_proj: ColumnParallelLinear,
        positions: torch.Tensor | None = None,
        cos_sin_cache: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [T, hidden], ``qkv_proj`` the layer's fused q|k|v projection (this rank's heads) -> [T, Hq * D].

        With ``positions`` [T] and a rotary ``cos_sin_cache``, q and k are rotated before k is cached.
        """
        md = current_metadata()
        q = self.ops.qkv_kv_write(x, qkv_proj.weight, qkv_proj.bias, self.num_heads, self.num_kv_heads,
                                  self.k_cache, self.v_cache, md.slot_mapping, positions, cos_sin_cache)
        out = self.ops.paged_attention(
            q, self.k_cache, self.v_cache, md.block_tables, md.query_start_loc, md.seq_lens, self.scale,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
        )
        return out.flatten(1)
