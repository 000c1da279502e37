"""Paged attention for a SplitFuse batch in one Triton kernel launch, the split-KV (flash-decoding) merge included.

The semantics are ``kernels.paged_attention.paged_attention_ref``'s. The work is cut into query tiles:

    rows of a tile = BLOCK_Q new tokens of one sequence x the GROUP = Hq // Hkv query heads of one kv head
        row r -> token q_tile * BLOCK_Q + r // GROUP of the sequence, query head kv_head * GROUP + r % GROUP

so the K/V tile read from the paged cache serves every query head of its kv head (GQA/MQA for free), and a
decode token fills GROUP rows. Grid: (query tiles x Hkv, NUM_SPLITS). Sequence b owns the global tile ids

    [query_start_loc[b] // BLOCK_Q + b,  query_start_loc[b + 1] // BLOCK_Q + b + 1)

(possibly one more than it needs: such a program returns at once), so T // BLOCK_Q + B programs cover every
tile and each program finds its sequence by a binary search over query_start_loc, with no host sync.

Keys are walked in BLOCK_N tiles, each key's physical block read from the block table. Key tiles visible to
every row of the query tile run unmasked; the tiles crossing the causal diagonal (and the partial last
block) run masked. Softmax is online, in float32 and base 2 (``qk_scale = scale * log2 e``).

With NUM_SPLITS > 1 the kernel cuts each sequence's key range into at most NUM_SPLITS BLOCK_N-aligned
segments of at least MIN_KEYS_PER_ACTIVE_SPLIT keys, one per program along grid axis 1: a context shorter
than the launch was sized for (a CUDA graph is captured for the longest) fills only its first n_active
splits, and the other programs do nothing. Each active one writes unnormalised partial results (acc
[T, Hq, S, D_pad], and [max, sum] [T, Hq, S, 2]), then bumps its tile's arrival counter (one int32 per
program along axis 0); still in the one launch, the last of the n_active to arrive merges the tile's rows,
out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, and sets the counter back to 0 for the next launch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
# at most 16 splits: a graph is captured for the longest context, and at a short one the launch's idle split
# programs cost time (H100, batch 1, 577-640 keys, bench/results-h100-attention-splits.json: Llama-3-8B 5.7 us
# with 16 splits, 6.7 with 32, 8.8 with 64; GPT-2 XL 6.3 with 16, 6.9 with 4, 8.9 with 32)
MAX_SPLITS = 16
MIN_KEYS_PER_ACTIVE_SPLIT = 64  # the fewest keys a split that holds any gets (also at the context sized for)
MERGE_ELEMS = 8192  # float32 partials the merging program loads a step: 64 registers a thread at 4 warps


@triton.jit
def _find_seq(query_start_loc, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile id, query_start_loc[b] // BLOCK_Q + b, is <= ``tile``."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, table_row, start, end, q_limit, qk_scale,
                  stride_kb, stride_ks, stride_vb, stride_vs,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over keys [start, end) in BLOCK_N tiles. MASKED: row r sees only keys <= q_limit[r]."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    # block ids are read one tile ahead: K/V addresses then come from the previous step, which lets the
    # software pipeliner keep num_stages - 1 K/V tiles in flight (an in-step table read allows only one)
    keys = start + tl.arange(0, BLOCK_N)
    blk = tl.load(table_row + keys // BLOCK_SIZE, mask=keys < end, other=0).to(tl.int64)
    for tile_start in range(start, end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (keys < end)[:, None] & dim_ok[None, :]
        else:
            kv_mask = dim_ok[None, :]
        k_ptrs = k_base + (blk * stride_kb + (keys % BLOCK_SIZE) * stride_ks)[:, None] + dims[None, :]
        v_ptrs = v_base + (blk * stride_vb + (keys % BLOCK_SIZE) * stride_vs)[:, None] + dims[None, :]
        if MASKED or HEAD_DIM != HEAD_DIM_PAD:  # the pad dims of a head (80 -> 128) must read as zeros
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(keys[None, :] <= q_limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        ahead = keys + BLOCK_N
        blk = tl.load(table_row + ahead // BLOCK_SIZE, mask=ahead < end, other=0).to(tl.int64)
    return acc, m_i, l_i


@triton.jit
def _merge_splits(out, part_acc, part_ml, token, kv_head, num_q_heads, stride_ot, stride_oh, n_active,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    """out[token, the GROUP heads of kv_head] = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over the first
    n_active splits, m = max_s m_s (finite: segment 0 holds key 0, which every row sees). All heads at once,
    MERGE_CHUNK splits of each a step: one round trip to memory a chunk, not one a head."""
    token = token.to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    first = (token * num_q_heads + kv_head * GROUP + g) * NUM_SPLITS  # each head's split-0 partial
    s_all = tl.arange(0, NUM_SPLITS)[None, :]
    m_s = tl.load(part_ml + (first[:, None] + s_all) * 2, mask=g_ok[:, None] & (s_all < n_active),
                  other=float("-inf"))
    m = tl.where(g_ok, tl.max(m_s, 1), 0.0)  # pad heads: any finite m (never stored)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    # num_stages=1: a chunk at a time in registers, no shared-memory stages on top of the attention loop's
    for s0 in tl.range(0, n_active, MERGE_CHUNK, num_stages=1):
        s = s0 + tl.arange(0, MERGE_CHUNK)[None, :]
        ok = g_ok[:, None] & (s < n_active)
        part = first[:, None] + s
        w = tl.math.exp2(tl.load(part_ml + part * 2, mask=ok, other=float("-inf")) - m[:, None])
        l_i += tl.sum(w * tl.load(part_ml + part * 2 + 1, mask=ok, other=0.0), 1)
        acc_s = tl.load(part_acc + part[:, :, None] * HEAD_DIM_PAD + dims[None, None, :], mask=ok[:, :, None],
                        other=0.0)
        acc += tl.sum(acc_s * w[:, :, None], 1)
    l_i = tl.where(g_ok, l_i, 1.0)  # pad heads: no 0/0
    o_ptrs = out + token * stride_ot + (kv_head * GROUP + g)[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out.dtype.element_ty), mask=g_ok[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _query_tile(out, part_acc, part_ml, counter, q, k_base, v_base, table_row, q_start, q_len, first_q, context_len,
                kv_head, split, qk_scale, num_q_heads, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_vb, stride_vs,
                GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
                NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, MERGE_CHUNK: tl.constexpr,
                DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Attention of query tokens [first_q, first_q + TOKENS) of one sequence, all GROUP heads of kv_head."""
    if PDL:
        # launched early (kernels.rms_norm.wait_for_producers, inlined: this file jits at import). The sequence
        # lookup above read only step metadata, which the host wrote before the step; q and the new K/V come
        # from the kernel just before, so the wait precedes every other load.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    q_pos = first_q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (q_pos < q_len)
    token = (q_start + q_pos).to(tl.int64)
    io_mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    qv = tl.load(q + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)

    # keys [0, all_see) are visible to every row of the tile; keys >= kv_end to none
    all_see = context_len + first_q + 1
    kv_end = context_len + tl.minimum(first_q + TOKENS, q_len)
    lo = 0
    hi = kv_end
    n_active = 1
    if NUM_SPLITS > 1:
        # at least MIN_SPLIT_TILES key tiles a split: a short context (a graph captured for the longest) takes
        # only the splits it fills; the others attend to nothing, write nothing, and the merge skips them
        per_split = tl.maximum(tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N), MIN_SPLIT_TILES) * BLOCK_N
        n_active = tl.cdiv(kv_end, per_split)
        lo = tl.minimum(split * per_split, kv_end)
        hi = tl.minimum(lo + per_split, kv_end)
    unmasked_end = tl.maximum(tl.minimum(hi, all_see // BLOCK_N * BLOCK_N), lo)

    acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    q_limit = context_len + q_pos
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, qv, k_base, v_base, table_row, lo, unmasked_end, q_limit,
                                  qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                  HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, qv, k_base, v_base, table_row, unmasked_end, hi, q_limit,
                                  qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                                  HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        o_ptrs = out + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=io_mask)
    elif split < n_active:
        part = (token * num_q_heads + head) * NUM_SPLITS + split
        tl.store(part_acc + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml + part * 2, m_i, mask=row_ok)
        tl.store(part_ml + part * 2 + 1, l_i, mask=row_ok)
        # every thread has issued its stores (barrier) before the program's one arrival, whose release (gpu
        # scope) publishes them; the last arrival's acquire orders its merge loads after every split's stores
        tl.debug_barrier()
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_active - 1:
            for i in range(tl.minimum(TOKENS, q_len - first_q)):
                _merge_splits(out, part_acc, part_ml, q_start + first_q + i, kv_head, num_q_heads, stride_ot,
                              stride_oh, n_active, GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, NUM_SPLITS, MERGE_CHUNK)
            tl.store(counter, 0)  # every active split has arrived: ready for the next launch, with no memset


@triton.jit
def _paged_attention_kernel(
    out, part_acc, part_ml, counters, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, qk_scale,
    num_seqs, num_q_heads, num_kv_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, SMALL_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    # kv heads vary fastest and the last query tiles (the longest causal rows of a chunk) start first,
    # so the work left for the last wave is short
    pid, split = tl.program_id(0), tl.program_id(1)
    kv_head = pid % num_kv_heads
    tile = tl.num_programs(0) // num_kv_heads - 1 - pid // num_kv_heads
    b = _find_seq(query_start_loc, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    first_q = (tile - q_start // BLOCK_Q - b) * BLOCK_Q
    if first_q >= q_len:
        return
    context_len = tl.load(seq_lens + b) - q_len
    k_base = k_cache + kv_head * stride_kh
    v_base = v_cache + kv_head * stride_vh
    table_row = block_tables + b.to(tl.int64) * stride_bt
    counter = counters + pid
    if BLOCK_M > SMALL_M and q_len * GROUP <= SMALL_M:
        # a decode token in a prompt-sized launch: a SMALL_M-row tile instead of BLOCK_M rows mostly empty
        _query_tile(out, part_acc, part_ml, counter, q, k_base, v_base, table_row, q_start, q_len, first_q, context_len,
                    kv_head, split, qk_scale, num_q_heads, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ks, stride_vb, stride_vs, GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD,
                    BLOCK_SIZE, SMALL_M, SMALL_M // GROUP, BLOCK_N, NUM_SPLITS, MIN_SPLIT_TILES, MERGE_CHUNK,
                    DOT_PRECISION, PDL)
    else:
        _query_tile(out, part_acc, part_ml, counter, q, k_base, v_base, table_row, q_start, q_len, first_q, context_len,
                    kv_head, split, qk_scale, num_q_heads, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_ks, stride_vb, stride_vs, GROUP, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD,
                    BLOCK_SIZE, BLOCK_M, BLOCK_Q, BLOCK_N, NUM_SPLITS, MIN_SPLIT_TILES, MERGE_CHUNK, DOT_PRECISION,
                    PDL)


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of a query tile (tokens x query heads of one kv head); >= 16 for tl.dot
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def tile_config(group: int, head_dim: int, max_query_len: int, elem_bytes: int = 2) -> TileConfig:
    """Fixed H100 choices by the rows one sequence fills and the padded head dim (no autotuning: the first
    call must not benchmark, and a CUDA graph must capture the same kernel every time).

    Decode (a sequence fills <= 16 rows) is memory-bound: 16-row tiles waste no MMA rows, and 32-key steps
    with 3 stages keep two K/V tiles in flight in ~38 KB of shared memory, so 64 x 8 programs fit in one
    wave on 132 SMs. Prefill: 128 x 64 tiles with 8 warps (two warpgroups on wgmma), the shape the Triton
    fused-attention tutorial settles on for Hopper and D <= 128; 64-row tiles for short chunks and D > 128.
    float32 (tests) has twice the bytes a tile: one stage fewer keeps it within shared memory.
    """
    rows = max_query_len * group
    min_m = max(16, triton.next_power_of_2(group))
    d_pad = triton.next_power_of_2(head_dim)
    stages = 3 if elem_bytes <= 2 else 2
    if rows <= 16:
        return TileConfig(min_m, 32, 4, stages)
    if rows <= 64 or d_pad > 128:
        return TileConfig(max(64, min_m), 64 if d_pad <= 128 else 32, 4, stages)
    return TileConfig(max(128, min_m), 64, 8, stages)


@cache
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; the interpreter gets 8, a small GPU's worth."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_kv_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, num_sms: int) -> int:
    """Split the key range only for decode-only batches that would leave SMs idle (< 2 programs per SM).

    Enough splits for ~4 programs per SM, each reading >= MIN_KEYS_PER_ACTIVE_SPLIT keys, at most MAX_SPLITS,
    rounded down to a power of two (the reduction loads all splits as one vector; few values, few compilations).
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= 2 * num_sms:
        return 1
    splits = min(triton.cdiv(4 * num_sms, programs), max_seq_len // MIN_KEYS_PER_ACTIVE_SPLIT, MAX_SPLITS)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    *,
    num_kv_splits: int | None = None,
    config: TileConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``paged_attention_ref`` as one launch (split-KV too); returns a new [T, Hq, D] tensor.

    max_query_len / max_seq_len (python ints) pick the tile shape and the split count; when None they are
    read from the device (a sync). num_kv_splits (a power of two) and config override the choices. ``pdl``:
    launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return torch.empty_like(q)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    group = num_q_heads // num_kv_heads
    cfg = config or tile_config(group, head_dim, max_query_len, q.element_size())
    splits = num_kv_splits or choose_kv_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len,
                                               _sm_count(q.device))
    if splits & (splits - 1) or num_q_heads % num_kv_heads or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"need num_kv_splits={splits} a power of two, Hq={num_q_heads} a multiple of "
                         f"Hkv={num_kv_heads}, query_start_loc of {num_seqs} + 1 entries")
    # with PDL the sequence lookup reads query_start_loc and seq_lens before the wait: not if a conversion
    # kernel launched just below writes them (the other inputs are read after the wait)
    meta_as_given = query_start_loc.dtype == torch.int32 and seq_lens.dtype == torch.int32
    q, k_cache, v_cache, block_tables = (t if t.stride(-1) == 1 else t.contiguous()
                                         for t in (q, k_cache, v_cache, block_tables))
    return _launch(q, k_cache, v_cache, block_tables, query_start_loc.to(torch.int32), seq_lens.to(torch.int32),
                   scale, cfg, splits, pdl and q.is_cuda and meta_as_given)


# per device, the split-KV arrival counters: zero between launches, since the last split program of each tile
# sets its own back. The newest buffer is last; the older, smaller ones are kept, never freed, because a CUDA
# graph captured with one replays its address.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of >= n counters on ``device``, grown to the next power of two when too small."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        # Growing inside a CUDA graph capture records this memset into that graph and takes the memory from its
        # pool (held here, so it outlives the graph's own tensors); the counters read zero only once that graph
        # has replayed, hence engine.cuda_graphs' eager warm-up of every shape before its capture.
        buffers.append(torch.zeros(triton.next_power_of_2(n), dtype=torch.int32, device=device))
    return buffers[-1]


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, cfg: TileConfig,
            splits: int, pdl: bool) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    group, d_pad = num_q_heads // num_kv_heads, triton.next_power_of_2(head_dim)
    group_pad = triton.next_power_of_2(group)
    out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    block_q = cfg.block_m // group
    programs = (num_tokens // block_q + num_seqs) * num_kv_heads
    part_acc = part_ml = counters = out  # unused unless split
    if splits > 1:
        part_acc = torch.empty(num_tokens, num_q_heads, splits, d_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_tokens, num_q_heads, splits, 2, dtype=torch.float32, device=q.device)
        counters = _split_counters(q.device, programs)
    _paged_attention_kernel[(programs, splits)](
        out, part_acc, part_ml, counters, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale * LOG2E,
        num_seqs, num_q_heads, num_kv_heads, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, SMALL_M=max(16, group_pad), BLOCK_N=cfg.block_n, NUM_SPLITS=splits,
        MIN_SPLIT_TILES=max(1, MIN_KEYS_PER_ACTIVE_SPLIT // cfg.block_n),
        MERGE_CHUNK=min(splits, max(1, MERGE_ELEMS // (group_pad * d_pad))),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, PDL=pdl, **({"launch_pdl": True} if pdl else {}),
    )
    return out
