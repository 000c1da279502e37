"""One-row linear (a decode step at batch 1), alone or fused with the pre-norm before it and the activation
after it, read at the bandwidth of the weights.

    gemv(x, W, b)                           y = x W^T + b                                    x [1, K]
    norm_gemv(x, residual, norm, W, b, act) h = x + residual; y = act(norm(h) W^T + b); returns (y, h)

cuBLAS cuts a one-row product into tiles of 64 outputs with no split along K when the weight is square-ish:
Llama-3-8B's o_proj (4096 x 4096) runs as 64 blocks on an H100's 132 SMs, below 70% of copy bandwidth.
Here a program owns BLOCK_N output rows, walks K in BLOCK_K slices of 16-byte loads, keeps per-lane
partial sums in float32 and reduces them once at the end; 4096 outputs / BLOCK_N 2 = 2048 programs.
Bias is added in float32 and the result rounded once, as cuBLAS's epilogue does; ``linear_ref`` (F.linear)
is the reference. Measured with cold weights on an H100 (bench/skinny_linear.py), 2 x 2048 tiles beat
cuBLAS on 14 of the 15 Llama-3-8B/1B and GPT-2 XL projections (8B o_proj 14.3 vs 16.4 us, lm_head 345 vs
371 us; GPT-2's fc 11.3 vs 10.5 us is the exception) and need no split-K reduce kernel.

Every program reads all of x anyway, so the norm before a projection costs no extra launch: each program
first walks x (+ residual) once for the row statistics (an L2-resident read of a few KB), then normalises
each x slice in registers as it multiplies. Program 0 also writes h = x + residual, the next residual; the
inputs are never written, so no program can read a half-updated residual. The activation runs in the
epilogue: GELU on each output, or SiLU-and-mul with gate row r and up row r + n/2 in the same program.
Intermediate values are rounded to the activation dtype where the unfused ops round them (the norm's output,
the projection's output), so the fused kernel computes what ``Ops.norm_linear`` composes, op for op.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.activation import tanh
from kernels.linear import linear_ref
from kernels.rms_norm import cdiv, jit_at_launch, next_power_of_2

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch

# NORM / ACT codes of _gemv_kernel (constexprs)
NO_NORM, RMS_NORM, LAYER_NORM = 0, 1, 2
ACTIVATIONS = {None: 0, "silu_and_mul": 1, "gelu_tanh": 2, "gelu": 3}


@jit_at_launch
def _residual_sum(x_ptr, res_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual), rounded to the residual's dtype as the unfused norm's residual add rounds it."""
    h = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=mask, other=0.0)
        h = (r.to(tl.float32) + h.to(tl.float32)).to(res_ptr.dtype.element_ty)
    return h


@jit_at_launch
def _row_stats(x_ptr, res_ptr, h_ptr, n_in, eps, h_end,
               NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, 1/std) of h for LayerNorm, (0, 1/rms) for RMSNorm; also stores h[:h_end] (all of it in one
    program, none in the others)."""
    sum_h = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, n_in, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        h = _residual_sum(x_ptr, res_ptr, cols, col_ok, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(h_ptr + cols, h, mask=cols < h_end)
        hf = h.to(tl.float32)
        sum_h += hf
        sum_sq += hf * hf
    mean = 0.0
    if NORM == 2:  # LayerNorm: the variance about the mean, in a second pass (no E[h^2] - mean^2 cancellation)
        mean = tl.sum(sum_h, 0) / n_in
        sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, n_in, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            col_ok = cols < n_in
            d = tl.where(col_ok, _residual_sum(x_ptr, res_ptr, cols, col_ok, HAS_RESIDUAL).to(tl.float32) - mean, 0.0)
            sum_sq += d * d
    return mean, tl.rsqrt(tl.sum(sum_sq, 0) / n_in + eps)


@jit_at_launch
def _normed_slice(x_ptr, res_ptr, nw_ptr, nb_ptr, cols, col_ok, mean, rstd,
                  NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The projection's input slice, as float32: x, or norm(x + residual) rounded to x's dtype."""
    if NORM == 0:
        y = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        h = _residual_sum(x_ptr, res_ptr, cols, col_ok, HAS_RESIDUAL)
        w = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM == 1:  # RMSNorm rounds h / rms before the weight (as transformers' LlamaRMSNorm does)
            y = w * (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)
        else:
            y = (h.to(tl.float32) - mean) * rstd * w + tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    return y


@jit_at_launch
def _gemv_kernel(x_ptr, res_ptr, h_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, n_lanes, n_in, stride_w, eps,
                 pair_rows, pair_stride, pos_ptr, cos_sin_ptr, slot_ptr, k_cache, v_cache, block_size,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                 KV: tl.constexpr, N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A lane of a program owns output row `rows` and, with SiLU-and-mul (ACT 1) or a KV write (KV 1, 2 with
    # rotary), also row `rows + pair_rows`: the up row of a gate row, or the second half of a rotary pair
    # (a head's features j and j + HALF). n_lanes: lanes of the launch (outputs, gated outputs, or pairs).
    TWO_ROWS: tl.constexpr = ACT == 1 or KV != 0
    pid = tl.program_id(0)
    lanes = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    lane_ok = lanes < n_lanes
    if KV != 0:  # pair p: feature p % HALF of head p // HALF (q heads, then k, then v)
        head = lanes // HALF
        rows = head * (2 * HALF) + lanes % HALF
    else:
        rows = lanes
    mean = 0.0
    rstd = 1.0
    if NORM != 0:
        mean, rstd = _row_stats(x_ptr, res_ptr, h_ptr, n_in, eps, tl.where(pid == 0, n_in, 0), NORM, HAS_RESIDUAL,
                                BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    pair_w_rows = w_rows + pair_stride  # pair_rows * stride_w, an int64 when it needs to be
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_pair = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, n_in, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        xv = _normed_slice(x_ptr, res_ptr, nw_ptr, nb_ptr, cols, col_ok, mean, rstd, NORM, HAS_RESIDUAL)
        w_mask = lane_ok[:, None] & col_ok[None, :]
        wv = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
        if TWO_ROWS:
            wp = tl.load(pair_w_rows + cols[None, :], mask=w_mask, other=0.0)
            acc_pair += wp.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=lane_ok, other=0.0).to(tl.float32)
    if ACT != 0 or KV != 0:  # what follows reads the projection's output as the unfused op would: rounded
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    y_pair = 0.0
    if TWO_ROWS:
        y_pair = tl.sum(acc_pair, axis=1)
        if HAS_BIAS:
            y_pair += tl.load(b_ptr + rows + pair_rows, mask=lane_ok, other=0.0).to(tl.float32)
        y_pair = y_pair.to(y_ptr.dtype.element_ty).to(tl.float32)
    if ACT == 1:
        y = y * tl.sigmoid(y) * y_pair
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    elif ACT == 3:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if KV == 0:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=lane_ok)
    else:
        _rotate_and_write_kv(y, y_pair, head, lanes % HALF, lane_ok, y_ptr, pos_ptr, cos_sin_ptr, slot_ptr,
                             k_cache, v_cache, block_size, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                             stride_vh, KV, N_HEADS, N_KV_HEADS, HALF)


@jit_at_launch
def _rotate_and_write_kv(a, b, head, j, ok, q_ptr, pos_ptr, cos_sin_ptr, slot_ptr, k_cache, v_cache, block_size,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         KV: tl.constexpr, N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, HALF: tl.constexpr):
    """The qkv projection's epilogue for one token: features j and j + HALF (a, b) of ``head``, rotated (KV 2,
    q and k heads) as kernels.rotary does; q heads go to q_ptr, k and v heads to the token's cache slot."""
    is_k = (head >= N_HEADS) & (head < N_HEADS + N_KV_HEADS)
    if KV == 2:
        pos = tl.load(pos_ptr).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + j)
        sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + j)
        rotate = head < N_HEADS + N_KV_HEADS
        a, b = tl.where(rotate, a * cos - b * sin, a), tl.where(rotate, b * cos + a * sin, b)
    q_ok = ok & (head < N_HEADS)
    tl.store(q_ptr + head * (2 * HALF) + j, a.to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(q_ptr + head * (2 * HALF) + HALF + j, b.to(q_ptr.dtype.element_ty), mask=q_ok)
    slot = tl.load(slot_ptr).to(tl.int64) + tl.zeros_like(head)  # negative: a padding token, nothing cached
    blk = tl.maximum(slot, 0) // block_size
    off = tl.maximum(slot, 0) % block_size
    k_ok = ok & is_k & (slot >= 0)
    k_at = k_cache + blk * stride_kb + off * stride_ks + (head - N_HEADS) * stride_kh + j
    tl.store(k_at, a.to(k_cache.dtype.element_ty), mask=k_ok)
    tl.store(k_at + HALF, b.to(k_cache.dtype.element_ty), mask=k_ok)
    v_ok = ok & (head >= N_HEADS + N_KV_HEADS) & (slot >= 0)
    v_at = v_cache + blk * stride_vb + off * stride_vs + (head - N_HEADS - N_KV_HEADS) * stride_vh + j
    tl.store(v_at, a.to(v_cache.dtype.element_ty), mask=v_ok)
    tl.store(v_at + HALF, b.to(v_cache.dtype.element_ty), mask=v_ok)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The models' linear under kernel injection: one row (batch-1 decode) by ``gemv``, more by cuBLAS."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, weight, bias)
    return linear_ref(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         block_n: int = 2, block_k: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """``linear_ref``'s contract for one row: x [1, in], weight [out, in] (rows contiguous) -> [1, out]."""
    _check_rows(x, weight)
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, None, None, None, 0.0, weight, bias, y, weight.shape[0], block_n=block_n, block_k=block_k,
            num_warps=num_warps)
    return y


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              norm_bias: torch.Tensor | None, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
              activation: str | None = None, *, block_n: int | None = None, block_k: int | None = None,
              num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ops.norm_linear`` for one row in one launch: RMSNorm (norm_bias None) or LayerNorm of x (+ residual),
    the projection, and ``activation`` (see ACTIVATIONS). Returns (y, h = x + residual); residual is not
    modified. SiLU-and-mul takes weight = [gate; up] (2n rows) and returns n outputs."""
    _check_norm(x, residual, norm_weight, norm_bias, weight)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    gated = activation == "silu_and_mul"
    if gated and weight.shape[0] % 2:
        raise ValueError(f"silu_and_mul needs an even number of weight rows ([gate; up]), got {weight.shape[0]}")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    # the gated product streams two weight rows per output: one output per program keeps the tile at 2 rows
    h = _launch(x, residual, norm_weight, norm_bias, eps, weight, bias, y, n_out, act=ACTIVATIONS[activation],
                pair_rows=n_out if gated else 0, block_n=block_n or (1 if gated else 2), block_k=block_k,
                num_warps=num_warps)
    return y, h


def norm_qkv_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  norm_bias: torch.Tensor | None, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
                  heads: tuple[int, int, int], positions: torch.Tensor, cos_sin_cache: torch.Tensor | None,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                  block_n: int = 1, block_k: int | None = None, num_warps: int = 4,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Ops.norm_qkv_kv_write`` for one token in one launch: the norm, the qkv projection, rotary (unless
    cos_sin_cache is None) over whole heads, k and v into the token's cache slot. Returns (q [1, Hq, D], h)."""
    num_heads, num_kv_heads, head_dim = heads
    _check_norm(x, residual, norm_weight, norm_bias, weight)
    if weight.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv weight rows {weight.shape[0]} != (Hq + 2 Hkv) x D for heads {heads} (D even)")
    if cos_sin_cache is not None and cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"fused rotary turns whole heads: rot_dim {cos_sin_cache.shape[-1]} != head_dim {head_dim}")
    half = head_dim // 2
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    h = _launch(x, residual, norm_weight, norm_bias, eps, weight, bias, q, weight.shape[0] // 2,
                kv=(positions, cos_sin_cache, slot_mapping, k_cache, v_cache, heads), pair_rows=half,
                block_n=block_n, block_k=block_k, num_warps=num_warps)
    return q, h


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, {weight.shape[1]}], got {list(x.shape)}")


def _check_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                norm_bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    _check_rows(x, weight)
    if norm_weight.shape != (x.shape[-1],) or (norm_bias is not None and norm_bias.shape != norm_weight.shape):
        raise ValueError(f"norm weights must be [{x.shape[-1]}], got {list(norm_weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {list(x.shape)} {x.dtype}, "
                         f"got {list(residual.shape)} {residual.dtype}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
            norm_bias: torch.Tensor | None, eps: float, weight: torch.Tensor, bias: torch.Tensor | None,
            y: torch.Tensor, n_lanes: int, *, act: int = 0, kv: tuple | None = None, pair_rows: int = 0,
            block_n: int, block_k: int | None, num_warps: int) -> torch.Tensor:
    """Launches _gemv_kernel with ``n_lanes`` lanes writing y (see the kernel); returns h = x (+ residual)."""
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    n_in = weight.shape[1]
    # 2 rows x 2048 columns a program: the fastest tile on an H100 for every Llama-3 and GPT-2 XL projection
    # (bench/skinny_linear.py), about 15 KB of loads in flight per program
    block_k = block_k or min(2048, next_power_of_2(n_in))
    h = x if residual is None else torch.empty_like(x)
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    norm = NO_NORM if norm_weight is None else RMS_NORM if norm_bias is None else LAYER_NORM
    kv_mode, heads, kv_args = 0, (0, 0, 2), (x, x, x, x, x, 1, 0, 0, 0, 0, 0, 0)
    if kv is not None:
        positions, cos_sin_cache, slot_mapping, k_cache, v_cache, heads = kv
        kv_mode = 1 if cos_sin_cache is None else 2
        kv_args = (positions, cos_sin_cache if cos_sin_cache is not None else x, slot_mapping, k_cache, v_cache,
                   k_cache.shape[1], *k_cache.stride()[:3], *v_cache.stride()[:3])
    _gemv_kernel[(cdiv(n_lanes, block_n),)](
        x, residual if residual is not None else x, h, norm_weight if norm_weight is not None else x,
        norm_bias if norm_bias is not None else x, weight, bias if bias is not None else weight, y,
        n_lanes, n_in, weight.stride(0), eps, pair_rows, pair_rows * weight.stride(0), *kv_args,
        NORM=norm, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, ACT=act, KV=kv_mode,
        N_HEADS=heads[0], N_KV_HEADS=heads[1], HALF=heads[2] // 2, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return h
