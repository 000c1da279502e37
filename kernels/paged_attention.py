"""Attention over the paged KV cache for a SplitFuse batch: prefill chunks and decode tokens together."""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over all of its cached keys.

    q: [T, Hq, D], the new tokens of B sequences laid end to end; sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1] (int tensor [B+1]; seq_lens is [B]). Its K/V (the new tokens included, already written)
    live in the cache blocks block_tables[b, :] and number seq_lens[b]; the new queries are the
    last tokens of that context, so query i may see keys 0 .. seq_len - num_queries + i.

        k_cache[block, offset, kv_head, :]   block_tables[b] = [7, 2, 9]  block_size = 4
        token t of sequence b  ->  block block_tables[b, t // 4], offset t % 4

    Hq is a multiple of Hkv (GQA/MQA): query head h reads kv head h // (Hq // Hkv).
    Returns [T, Hq, D] in q's dtype; softmax in float32.
    """
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[b, :num_blocks]
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        qb = q[start:end].float()
        scores = torch.einsum("qhd,khd->hqk", qb, k.repeat_interleave(group, dim=1)) * scale
        n = end - start
        mask = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - n)
        scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(group, dim=1)).to(q.dtype)
    return out
