"""The one-row linear kernel against F.linear (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import gemv
from kernels.linear import linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n_out", "n_in"), [(8, 64), (37, 100), (96, 1030), (250, 48)])
def test_gemv_matches_linear(n_out: int, n_in: int, bias: bool) -> None:
    """Outputs and inputs that fill no tile exactly, with and without bias."""
    x, w = randn(1, n_in), randn(n_out, n_in)
    b = randn(n_out) if bias else None
    torch.testing.assert_close(gemv(x, w, b, block_n=8, block_k=64), linear_ref(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv(x, w, b), linear_ref(x, w, b), atol=1e-4, rtol=1e-4)  # the default tile


def test_gemv_reads_strided_weights_and_rows() -> None:
    w = randn(64, 160)[:, :80]  # rows with a stride: a column slice of a wider matrix
    x = randn(3, 80)[1:2]
    torch.testing.assert_close(gemv(x, w, block_n=16, block_k=32), linear_ref(x, w), atol=1e-4, rtol=1e-4)


def test_gemv_refuses_more_than_one_row() -> None:
    with pytest.raises(ValueError, match="gemv takes x"):
        gemv(randn(2, 16), randn(8, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_half_precision_on_gpu(dtype: torch.dtype) -> None:
    x, w, b = randn(1, 4096, dtype=dtype), randn(4096, 4096, dtype=dtype) * 0.02, randn(4096, dtype=dtype)
    ref = linear_ref(x.float(), w.float(), b.float())
    err, ref_err = (gemv(x, w, b).float() - ref).abs().max(), (linear_ref(x, w, b).float() - ref).abs().max()
    assert err <= 1.5 * ref_err + 1e-3


def test_injected_linear_routes_one_row_to_the_kernel() -> None:
    from kernels import get_ops

    linear = get_ops("triton").linear
    w, b = randn(40, 72), randn(40)
    for rows in (1, 3):
        x = randn(rows, 72)
        torch.testing.assert_close(linear(x, w, b), linear_ref(x, w, b), atol=1e-4, rtol=1e-4)
