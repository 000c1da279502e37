"""Attention over the paged KV cache for a SplitFuse batch: prefill chunks and decode tokens together."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over all of its cached keys.

    q: [T, Hq, D], the new tokens of B sequences laid end to end; sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1] (int tensor [B+1]; seq_lens is [B]). Its K/V (the
    new tokens included, already written) live in the cache blocks block_tables[b, :] and number
    seq_lens[b]; the new queries are the last tokens of that context, so query i may see keys
    0 .. seq_len - num_queries + i.

        k_cache[block, offset, kv_head, :]   block_tables[b] = [7, 2, 9]  block_size = 4
        token t of sequence b  ->  block block_tables[b, t // 4], offset t % 4

    Hq is a multiple of Hkv (GQA/MQA): query head h reads kv head h // (Hq // Hkv).
    Returns [T, Hq, D] in q's dtype; the arithmetic is float32. Single-token (decode) sequences
    are done in one batched call, prompt chunks one sequence at a time. max_query_len / max_seq_len
    (python ints the engine knows) are accepted and ignored: the Triton launcher
    (``kernels.paged_attention_triton``) uses them to pick tiles without a sync.
    """
    out = torch.empty_like(q)
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if decodes:
        rows = query_start_loc[:-1][decodes]
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, block_tables[decodes], seq_lens[decodes], scale)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, n in enumerate(q_lens):
        if n > 1:
            s = starts[b]
            out[s : s + n] = _chunk(q[s : s + n], k_cache, v_cache, block_tables[b], lens[b], scale)
    return out


def _gather(cache: torch.Tensor, tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[..., blocks] block ids -> [..., num_tokens, Hkv, D] float32 keys or values."""
    blocks = -(-num_tokens // cache.shape[1])
    return cache[tables[..., :blocks]].flatten(-4, -3)[..., :num_tokens, :, :].float()


def _decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at its last position; keys past seq_len are masked."""
    max_len = int(seq_lens.max())
    k, v = _gather(k_cache, tables, max_len), _gather(v_cache, tables, max_len)  # [B, L, Hkv, D]
    mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)  # [B, L]
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        scale=scale, enable_gqa=True,
    )  # [B, Hq, 1, D]
    return out.squeeze(2).to(q.dtype)


def _chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, seq_len: int,
           scale: float) -> torch.Tensor:
    """q: [n, Hq, D], the last n positions of a sequence of seq_len cached tokens."""
    n = q.shape[0]
    k, v = _gather(k_cache, table, seq_len), _gather(v_cache, table, seq_len)  # [L, Hkv, D]
    mask = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - n)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=True,
    )  # [Hq, n, D]
    return out.transpose(0, 1).to(q.dtype)
