"""One-row linear (a decode step at batch 1): y = x W^T + b for x [1, K], read at the bandwidth of the weights;
optionally with the MLP's activation in its epilogue.

cuBLAS cuts a one-row product into tiles of 64 outputs with no split along K when the weight is square-ish:
Llama-3-8B's o_proj (4096 x 4096) runs as 64 blocks on an H100's 132 SMs, below 70% of copy bandwidth.
Here a program owns BLOCK_N output rows, walks K in BLOCK_K slices of 16-byte loads, keeps per-lane
partial sums in float32 and reduces them once at the end; 4096 outputs / BLOCK_N 2 = 2048 programs.
Bias is added in float32 and the result rounded once, as cuBLAS's epilogue does; ``linear_ref`` (F.linear)
is the reference. Measured with cold weights on an H100 (bench/skinny_linear.py), 2 x 2048 tiles beat
cuBLAS on 14 of the 15 Llama-3-8B/1B and GPT-2 XL projections (8B o_proj 14.3 vs 16.4 us, lm_head 345 vs
371 us; GPT-2's fc 11.3 vs 10.5 us is the exception) and need no split-K reduce kernel; under PDL the
row-parallel projections run faster with 4 rows a program (``gemv``).

With programmatic dependent launch (``pdl``) a program loads its first K slice of the weights before it waits
for the kernel that writes x: the weights stream in while the norm or attention before it finishes.

``linear_act`` puts the activation after the product in the same launch (``linear_act_ref``'s contract):
GELU on each output, or SiLU-and-mul with each program owning matching rows of gate and up, so the
intermediate [gate | up] never goes to memory and the activation costs no launch of its own. The products
are rounded to x's dtype before the activation, as the separate kernels see them.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.activation import gelu, gelu_f32, silu_and_mul, silu_mul_f32
from kernels.linear import check_activation, linear_ref
from kernels.rms_norm import cdiv, jit_at_launch, next_power_of_2, pdl_meta, wait_for_producers

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch

_NO_ACT, _GELU_TANH, _GELU_ERF = 0, 1, 2  # the plain kernel's ACT constexpr


@jit_at_launch
def row_dots(x_ptr, w_rows, row_ok, n_in, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """x . W[r] in float32 for each row r of a tile; ``w_rows`` [R] points at each row's first weight. The first
    K slice of the weights is loaded before the PDL wait (nothing in the step writes weights); x after it."""
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_in
    wv = tl.load(w_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    wait_for_producers(PDL)
    xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = wv.to(tl.float32) * xv[None, :]
    for k in range(BLOCK_K, n_in, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        wv = tl.load(w_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    return tl.sum(acc, axis=1)


@jit_at_launch
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_out, n_in, stride_w,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    y = row_dots(x_ptr, w_ptr + rows.to(tl.int64) * stride_w, row_ok, n_in, BLOCK_K, PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if ACT != 0:  # GELU of the rounded product, as the separate kernel would read it
        y = gelu_f32(y.to(y_ptr.dtype.element_ty).to(tl.float32), ACT == 1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@jit_at_launch
def _gemv_silu_mul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_out, n_in, stride_w,
                          HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """y[j] = silu(gate[j]) * up[j] for the BLOCK_P outputs j of a program; W = [gate (n_out rows) | up]. Tile row
    2i is gate row j_i and row 2i + 1 is up row j_i, so one split of the products gives both."""
    r = tl.arange(0, 2 * BLOCK_P)
    out = tl.program_id(0) * BLOCK_P + r // 2
    rows = out + (r % 2) * n_out
    row_ok = out < n_out
    y = row_dots(x_ptr, w_ptr + rows.to(tl.int64) * stride_w, row_ok, n_in, BLOCK_K, PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(y.to(y_ptr.dtype.element_ty).to(tl.float32), [BLOCK_P, 2]))
    outs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    tl.store(y_ptr + outs, silu_mul_f32(gate, up).to(y_ptr.dtype.element_ty), mask=outs < n_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           pdl: bool = False) -> torch.Tensor:
    """The models' linear under kernel injection: one row (batch-1 decode) by ``gemv``, more by cuBLAS."""
    if is_one_row(x):
        return gemv(x, weight, bias, pdl=pdl)
    return linear_ref(x, weight, bias)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str, *,
               pdl: bool = False) -> torch.Tensor:
    """``linear_act_ref``'s contract: one row in one launch (``gemv``'s product with the activation in its
    epilogue); more rows by cuBLAS, then the activation's kernel."""
    check_activation(activation)
    if is_one_row(x):
        return gemv(x, weight, bias, activation=activation, pdl=pdl)
    y = linear_ref(x, weight, bias)
    if activation == "silu_and_mul":
        return silu_and_mul(y, pdl=pdl)
    return gelu(y, "tanh" if activation == "gelu_tanh" else "none", pdl=pdl)


def is_one_row(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str | None = None,
         block_n: int | None = None, block_k: int | None = None, num_warps: int = 4, pdl: bool = False
         ) -> torch.Tensor:
    """``linear_ref``'s contract for one row (``linear_act_ref``'s with an ``activation``): x [1, in], weight
    [out, in] (rows contiguous) -> [1, out] ([1, out / 2] for silu_and_mul). ``block_n``: rows a program reads
    (4 where in >= out, else 2; for silu_and_mul half of them gate and half up). ``pdl``: launch with
    programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, {weight.shape[1]}], got {list(x.shape)}")
    if activation is not None:
        check_activation(activation)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    n_out, n_in = weight.shape
    # 2048 columns a program; 4 rows where the rows are at least as long as the outputs are many (o_proj, down),
    # else 2: the fastest tiles on an H100 in a CUDA graph of PDL launches with cold weights
    # (bench/results-h100-gemv-tiles.json: 8B down 40.3 us with 4 rows vs 43.5 with 2, o_proj 11.8 vs 12.7; the
    # qkv, gate_up and fc projections stay fastest at 2)
    block_n = block_n or (4 if n_in >= n_out else 2)
    block_k = block_k or min(2048, next_power_of_2(n_in))
    meta = dict(HAS_BIAS=bias is not None, BLOCK_K=block_k, num_warps=num_warps, **pdl_meta(pdl, x.device))
    b = bias if bias is not None else weight
    if activation == "silu_and_mul":
        if n_out % 2 or block_n < 2 or block_n & (block_n - 1):
            raise ValueError(f"silu_and_mul needs an even number of weight rows and block_n a power of two >= 2; "
                             f"got {n_out} rows, block_n {block_n}")
        y = torch.empty(1, n_out // 2, dtype=x.dtype, device=x.device)
        _gemv_silu_mul_kernel[(cdiv(n_out // 2, block_n // 2),)](
            x, weight, b, y, n_out // 2, n_in, weight.stride(0), BLOCK_P=block_n // 2, **meta)
        return y
    act = {None: _NO_ACT, "gelu_tanh": _GELU_TANH, "gelu_erf": _GELU_ERF}[activation]
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    _gemv_kernel[(cdiv(n_out, block_n),)](x, weight, b, y, n_out, n_in, weight.stride(0), ACT=act, BLOCK_N=block_n,
                                          **meta)
    return y

