"""One-row linear (a decode step at batch 1): y = x W^T + b for x [1, K], read at the bandwidth of the weights.

cuBLAS cuts a one-row product into tiles of 64 outputs with no split along K when the weight is square-ish:
Llama-3-8B's o_proj (4096 x 4096) runs as 64 blocks on an H100's 132 SMs, below 70% of copy bandwidth.
Here a program owns BLOCK_N output rows, walks K in BLOCK_K slices of 16-byte loads, keeps per-lane
partial sums in float32 and reduces them once at the end; 4096 outputs / BLOCK_N 2 = 2048 programs.
Bias is added in float32 and the result rounded once, as cuBLAS's epilogue does; ``linear_ref`` (F.linear)
is the reference. Measured with cold weights on an H100 (bench/skinny_linear.py), 2 x 2048 tiles beat
cuBLAS on 14 of the 15 Llama-3-8B/1B and GPT-2 XL projections (8B o_proj 14.3 vs 16.4 us, lm_head 345 vs
371 us; GPT-2's fc 11.3 vs 10.5 us is the exception) and need no split-K reduce kernel.

With programmatic dependent launch (``pdl``) a program loads its first K slice of the weights before it waits
for the kernel that writes x: the weights stream in while the norm or attention before it finishes.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.linear import linear_ref
from kernels.rms_norm import cdiv, jit_at_launch, next_power_of_2, pdl_meta, wait_for_producers

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch


@jit_at_launch
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_out, n_in, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_in
    wv = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # weights only: no wait
    wait_for_producers(PDL)
    xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = wv.to(tl.float32) * xv[None, :]
    for k in range(BLOCK_K, n_in, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           pdl: bool = False) -> torch.Tensor:
    """The models' linear under kernel injection: one row (batch-1 decode) by ``gemv``, more by cuBLAS."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, weight, bias, pdl=pdl)
    return linear_ref(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         block_n: int = 2, block_k: int | None = None, num_warps: int = 4, pdl: bool = False) -> torch.Tensor:
    """``linear_ref``'s contract for one row: x [1, in], weight [out, in] (rows contiguous) -> [1, out].
    ``pdl``: launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, {weight.shape[1]}], got {list(x.shape)}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    n_out, n_in = weight.shape
    # 2 rows x 2048 columns a program: the fastest tile on an H100 for every Llama-3 and GPT-2 XL projection
    # (bench/skinny_linear.py), about 15 KB of loads in flight per program
    block_k = block_k or min(2048, next_power_of_2(n_in))
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else weight, y, n_out, n_in, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **pdl_meta(pdl, x.device),
    )
    return y
