"""SiLU-and-mul and GELU Triton kernels against their torch references (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import gelu, gelu_ref, silu_and_mul, silu_and_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),  # the reference rounds silu(gate) before the product: 2 ulp
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
TOKENS = (1, 7, 129, 300)
WIDTH = (48, 64, 96, 200)


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return (3 * torch.randn(*shape, generator=g)).to(device, dtype)


@pytest.mark.parametrize("inter", WIDTH)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_matches_reference(tokens: int, inter: int) -> None:
    x = randn(tokens, 2 * inter)
    y = silu_and_mul(x)
    assert y.shape == (tokens, inter)
    torch.testing.assert_close(y, silu_and_mul_ref(x), **TOL[torch.float32])


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("width", WIDTH)
@pytest.mark.parametrize("tokens", TOKENS)
def test_gelu_matches_reference(tokens: int, width: int, approximate: str) -> None:
    x = randn(tokens, width)
    torch.testing.assert_close(gelu(x, approximate), gelu_ref(x, approximate), **TOL[torch.float32])


def test_strided_batched_and_empty_inputs() -> None:
    x3 = randn(3, 43, 2 * 96)
    torch.testing.assert_close(silu_and_mul(x3), silu_and_mul_ref(x3), **TOL[torch.float32])
    sliced = randn(129, 500)[:, 100:300]  # rows 500 apart
    torch.testing.assert_close(silu_and_mul(sliced), silu_and_mul_ref(sliced), **TOL[torch.float32])
    transposed = randn(200, 129).t()
    torch.testing.assert_close(gelu(transposed), gelu_ref(transposed), **TOL[torch.float32])
    assert silu_and_mul(randn(0, 64)).shape == (0, 32) and gelu(randn(0, 64)).shape == (0, 64)


def test_gelu_tails_and_mode_check() -> None:
    x = torch.tensor([-1e4, -60.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 60.0, 1e4], device=DEVICE)
    for approximate in ("tanh", "none"):
        y = gelu(x, approximate)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, gelu_ref(x, approximate), **TOL[torch.float32])
    with pytest.raises(ValueError, match="approximate"):
        gelu(x, "sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_and_mul_llama3_8b_on_gpu(dtype: torch.dtype) -> None:
    x = randn(8192 + 5, 2 * 14336, dtype=dtype, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_full_size_on_gpu(dtype: torch.dtype, approximate: str) -> None:
    x = randn(8192 + 5, 4 * 4096, dtype=dtype, device="cuda")
    torch.testing.assert_close(gelu(x, approximate), gelu_ref(x, approximate), **TOL[dtype])
