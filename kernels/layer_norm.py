"""LayerNorm, optionally fused with the residual add that precedes it.

    s = x + residual                (rounded to residual's dtype, written back INTO residual)
    y = (s - mean(s)) / sqrt(var(s) + eps) * w + b    biased variance; float32 throughout, rounded once

A program normalises BLOCK_M whole rows held in registers (kernels.rms_norm.rows_launch).

``layer_norm`` (Triton) and ``layer_norm_ref`` (torch) share signature and side effects: with
``residual`` both update it in place and return ``(y, residual)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels.rms_norm import (
    as_rows,
    jit_at_launch,
    load_with_residual,
    pdl_meta,
    rows_launch,
    wait_for_producers,
    write_back,
)

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = (x - mean) / sqrt(var + eps) * w + b (biased variance).

    With ``residual``: residual <- residual + x (in place), then normalises that sum and returns
    (y, residual).
    """
    if residual is not None:
        x = residual.add_(x)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, x)


@jit_at_launch
def _layer_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_res, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr,  # the plain norm moves half the bytes: no dead residual loads or stores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    wait_for_producers(PDL)
    x = load_with_residual(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_res, HAS_RESIDUAL)
    h = x.to(tl.float32)
    mean = (tl.sum(h, axis=1) / n_cols)[:, None]
    centred = tl.where(mask, h - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)[:, None]
    tl.store(y_ptr + rows * stride_y + cols, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with ``layer_norm_ref``'s contract; x, residual: [..., hidden]; weight, bias: [hidden].
    ``pdl``: launch with programmatic dependent launch (``kernels.rms_norm.wait_for_producers``)."""
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2  # x2: a placeholder the kernel never reads
    y = torch.empty(x.shape, dtype=x.dtype if residual is None else residual.dtype, device=x.device)
    y2 = y.view(x2.shape)
    launch = rows_launch(x2.shape[0], x2.shape[1], x.device)
    if x2.numel() > 0:
        _layer_norm_kernel[launch.grid](
            x2, r2, weight, bias, y2, x2.shape[0], x2.shape[1], x2.stride(0), r2.stride(0), y2.stride(0), eps,
            HAS_RESIDUAL=residual is not None, **launch.meta, **pdl_meta(pdl, x.device),
        )
    return y if residual is None else (y, write_back(r2, residual))
