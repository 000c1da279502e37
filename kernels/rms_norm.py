"""RMSNorm, optionally fused with the residual add that precedes it.

    s = x + residual                        (rounded to residual's dtype, written back INTO residual)
    y = w * round(s / sqrt(mean(s^2) + eps))    statistics in float32, rounded to s's dtype before w

A program normalises BLOCK_M whole rows held in registers (rows_launch). This file also holds the
launch helpers the other kernel files share (jit_at_launch, tile sizes, programmatic dependent launch).

``rms_norm`` (Triton) and ``rms_norm_ref`` (torch) share signature and side effects: with
``residual`` both update it in place and return ``(y, residual)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch

MAX_HIDDEN = 65536  # one row lives in registers; wider rows would spill
ROW_TILE = 4096  # elements per program of the norm kernels on a GPU


class jit_at_launch:  # noqa: N801  (a decorator, named like triton.jit)
    """``@triton.jit`` applied at a kernel's first launch; triton itself is imported then too.

    ``import kernels`` never imports triton: a CPU engine does not need it, and TRITON_INTERPRET
    (which triton reads when it is imported, jitting its own ``tl.sum`` etc.) may still be set by a
    test's conftest after other tests imported ``kernels``. At first launch every ``jit_at_launch``
    object in the kernel's module globals (its helpers, imported ones included), and in those of the
    modules its helpers come from, becomes ``triton.jit`` of its function; ``tl`` is bound in each.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Callable:
        import triton
        import triton.language

        scope = self.fn.__globals__
        pending, seen = [scope], set()
        while pending:  # this module's helpers, then those of the modules they come from (their own helpers)
            globals_ = pending.pop()
            if id(globals_) in seen:
                continue
            seen.add(id(globals_))
            globals_["tl"] = triton.language
            for name, obj in list(globals_.items()):
                if isinstance(obj, jit_at_launch):
                    pending.append(obj.fn.__globals__)
                    globals_[name] = triton.jit(obj.fn)
        return scope[self.fn.__name__][grid]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.fn.__name__} is a Triton function: call it inside a kernel, or launch it")


@jit_at_launch
def wait_for_producers(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper+): a kernel launched with ``launch_pdl`` may start while the kernel
    before it still runs. It waits here until every earlier kernel has finished and its writes are visible, then
    lets the next kernel launch, whose programs start up (and load their weights) while this one works. Before
    this call a kernel stores nothing and reads only what no kernel of the step writes: weights, or the step's
    metadata the host copied in (attention's sequence lookup)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_meta(pdl: bool, device: torch.device) -> dict[str, bool]:
    """A launch's PDL constexpr and Triton's ``launch_pdl``: on only for CUDA (the interpreter has neither)."""
    on = pdl and device.type == "cuda"
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def tile_elements(elements: int, device: torch.device) -> int:
    """Elements per program: ``elements`` (sized for GPUs) on CUDA; 8x that on the CPU interpreter, which
    runs programs one after another and pays per op rather than per element (same code paths)."""
    return elements if device.type == "cuda" else 8 * elements


def warps_for(elements: int) -> int:
    """num_warps for a program of ``elements``: 16 elements per thread up to 2048, then 16 to 32."""
    return 4 if elements <= 2048 else 8 if elements <= 4096 else 16 if elements <= 16384 else 32


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like transformers' LlamaRMSNorm.

    With ``residual``: residual <- residual + x (in place), then normalises that sum and returns
    (y, residual) so the caller keeps the sum as the next residual.
    """
    if residual is not None:
        x = residual.add_(x)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if residual is None else (y, x)


@jit_at_launch
def load_with_residual(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_res, HAS_RESIDUAL: tl.constexpr):
    """The norms' input tile: x, or with HAS_RESIDUAL x + residual, rounded to the residual's dtype and
    written back into the residual (both norm kernels start this way)."""
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows * stride_res + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + rows * stride_res + cols, x, mask=mask)
    return x


@jit_at_launch
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_res, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr,  # the plain norm moves half the bytes: no dead residual loads or stores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    wait_for_producers(PDL)
    x = load_with_residual(x_ptr, res_ptr, rows, cols, mask, stride_x, stride_res, HAS_RESIDUAL)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)[:, None]
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    tl.store(y_ptr + rows * stride_y + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, pdl: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with ``rms_norm_ref``'s contract; x, residual: [..., hidden]; weight: [hidden].
    ``pdl``: launch with programmatic dependent launch (``wait_for_producers``)."""
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2  # x2: a placeholder the kernel never reads
    out_dtype = torch.promote_types(x.dtype if residual is None else residual.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(x2.shape)
    launch = rows_launch(x2.shape[0], x2.shape[1], x.device)
    if x2.numel() > 0:
        _rms_norm_kernel[launch.grid](
            x2, r2, weight, y2, x2.shape[0], x2.shape[1], x2.stride(0), r2.stride(0), y2.stride(0), eps,
            HAS_RESIDUAL=residual is not None, **launch.meta, **pdl_meta(pdl, x.device),
        )
    return y if residual is None else (y, write_back(r2, residual))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, hidden] with unit column stride: a view when possible, else a contiguous copy
    (``write_back`` copies it back into ``t`` after a kernel wrote it)."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t
    if t.is_contiguous():
        return t.view(-1, t.shape[-1])
    return t.reshape(-1, t.shape[-1]).contiguous()


def write_back(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Returns ``t`` holding the kernel's output ``rows`` (a no-op when ``rows`` is a view of ``t``)."""
    if rows.data_ptr() != t.data_ptr():
        t.copy_(rows.view(t.shape))
    return t


@dataclass(frozen=True)
class RowsLaunch:
    grid: tuple[int]
    meta: dict[str, int]


def rows_launch(n_rows: int, n_cols: int, device: torch.device) -> RowsLaunch:
    """Whole rows in registers, BLOCK_M rows per program so that a program holds about ROW_TILE elements
    (one row at Llama widths; several for GPT-2's 768), 8 to 16 elements per thread."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"norm kernels handle hidden <= {MAX_HIDDEN}, got {n_cols}")
    block_n = next_power_of_2(n_cols)
    block_m = max(1, tile_elements(ROW_TILE, device) // block_n)
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps_for(block_m * block_n)}
    return RowsLaunch((cdiv(n_rows, block_m),), meta)
