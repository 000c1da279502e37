"""Writes the step's new K and V into their slots of the paged KV cache."""

from __future__ import annotations

import torch


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
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]
