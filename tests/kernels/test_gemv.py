"""The one-row linear kernel, plain and with the MLP's activation in its epilogue, against F.linear and the
activation references (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import gemv, linear_act
from kernels.linear import linear_act_ref, linear_ref

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


@pytest.mark.parametrize("activation", ["silu_and_mul", "gelu_tanh", "gelu_erf"])
@pytest.mark.parametrize(("n_out", "n_in", "block_n"), [(74, 100, 2), (96, 1030, 8), (250, 48, 4)])
def test_gemv_with_activation_matches_linear_then_activation(activation: str, n_out: int, n_in: int,
                                                             block_n: int) -> None:
    """The epilogue's activation: silu_and_mul pairs gate row j with up row n_out/2 + j in one program."""
    x, w, b = randn(1, n_in), randn(n_out, n_in) / n_in**0.5, randn(n_out)
    for bias in (None, b):
        want = linear_act_ref(x, w, bias, activation)
        got = gemv(x, w, bias, activation=activation, block_n=block_n, block_k=64)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.shape == (1, n_out // 2 if activation == "silu_and_mul" else n_out)


def test_linear_act_takes_more_rows_through_cublas_and_the_activation_kernel() -> None:
    from kernels import get_ops

    ops, w, b = get_ops("triton"), randn(40, 72), randn(40)
    for rows in (1, 3):
        x = randn(rows, 72)
        for activation in ("silu_and_mul", "gelu_tanh", "gelu_erf"):
            torch.testing.assert_close(ops.linear_act(x, w, b, activation), linear_act_ref(x, w, b, activation),
                                       atol=1e-4, rtol=1e-4)


def test_linear_act_refuses_unknown_activations_and_odd_gate_up() -> None:
    x, w = randn(1, 16), randn(8, 16)
    for fn in (linear_act_ref, linear_act):
        with pytest.raises(ValueError, match="activation must be one of"):
            fn(x, w, None, "relu")
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv(x, randn(7, 16), activation="silu_and_mul")


@pytest.mark.gpu
@pytest.mark.parametrize(("n_out", "n_in", "activation"), [(2 * 14336, 4096, "silu_and_mul"),
                                                           (6400, 1600, "gelu_tanh")])
def test_gemv_with_activation_at_model_shapes_on_gpu(n_out: int, n_in: int, activation: str) -> None:
    """Llama-3-8B's gate_up and GPT-2 XL's fc in bf16: bitwise what the separate GEMV and activation kernel give
    when the tiles match, and within rounding of the float32 reference."""
    x, w, b = randn(1, n_in, dtype=torch.bfloat16), randn(n_out, n_in, dtype=torch.bfloat16) * 0.02, None
    got = gemv(x, w, b, activation=activation)
    want = linear_act(torch.cat([x, x]), w, b, activation)[:1]  # cuBLAS, then the activation kernel
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    ref = linear_act_ref(x.float(), w.float(), None, activation)
    assert (got.float() - ref).abs().max() <= 1.5 * (want.float() - ref).abs().max() + 1e-3
