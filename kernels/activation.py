"""Activations of the MLP: SiLU-and-mul (gated MLPs) and GELU (tanh or exact).

    silu_and_mul([gate | up]) = gate * sigmoid(gate) * up          [T, 2I] -> [T, I]
    gelu(x, "tanh") = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    gelu(x, "none") = x/2 * (1 + erf(x / sqrt(2)))

Kernels compute in float32 and round once to the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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

TILE = 2048  # elements per program on a GPU: 16 per thread at 4 warps (two 16-byte accesses for 16-bit dtypes)
GELU_MODES = ("tanh", "none")


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_ref(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU; ``approximate`` is "tanh" (GPT-2's gelu_new) or "none" (exact erf form)."""
    return F.gelu(x, approximate=approximate)


@jit_at_launch
def _silu_and_mul_kernel(x_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    gate = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_y + cols, silu_mul_f32(gate, up).to(y_ptr.dtype.element_ty), mask=mask)


@jit_at_launch
def silu_mul_f32(gate, up):
    """silu(gate) * up in float32 (shared with the GEMV's fused epilogue, so both round the same value)."""
    return gate * tl.sigmoid(gate) * up


def silu_and_mul(x: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """Triton launcher with ``silu_and_mul_ref``'s contract: x [..., 2I] -> [..., I], x's dtype.
    ``pdl``: launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    elements = tile_elements(TILE, x.device)
    block_n = min(next_power_of_2(n), elements)
    block_m = elements // block_n
    if y2.numel() > 0:
        _silu_and_mul_kernel[(cdiv(x2.shape[0], block_m), cdiv(n, block_n))](
            x2, y2, x2.shape[0], n, x2.stride(0), y2.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(TILE), **pdl_meta(pdl, x.device),
        )
    return y


@jit_at_launch
def _tanh(z):
    """tanh(z) = sign(z) (1 - e^-2|z|) / (1 + e^-2|z|): the exponential never overflows."""
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -r, r)


@jit_at_launch
def _gelu_kernel(x_ptr, y_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # TANH: the formula
    wait_for_producers(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, gelu_f32(x, TANH).to(y_ptr.dtype.element_ty), mask=mask)


@jit_at_launch
def gelu_f32(x, TANH: tl.constexpr):
    """GELU of float32 x, tanh or erf form (shared with the GEMV's fused epilogue)."""
    if TANH:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return y


def gelu(x: torch.Tensor, approximate: str = "tanh", *, pdl: bool = False) -> torch.Tensor:
    """Triton launcher with ``gelu_ref``'s contract: same shape and dtype as x; ``pdl`` as in ``silu_and_mul``."""
    if approximate not in GELU_MODES:
        raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
    xc = x.contiguous()
    y, n = torch.empty_like(xc), xc.numel()
    block = tile_elements(TILE, x.device)
    if n > 0:
        _gelu_kernel[(cdiv(n, block),)](xc, y, n, TANH=approximate == "tanh", BLOCK=block, num_warps=warps_for(TILE),
                                         **pdl_meta(pdl, x.device))
    return y
