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


def norm_linear_case(norm: str, residual: bool, bias: bool, activation: str | None, n_out: int, n_in: int):
    """Inputs of ``norm_linear``: x, residual, the norm's weight (and bias), the projection's weight and bias."""
    rows = 2 * n_out if activation == "silu_and_mul" else n_out
    return (
        randn(1, n_in), randn(1, n_in) if residual else None,
        1 + 0.1 * randn(n_in), 0.1 * randn(n_in + 1)[:n_in] if norm == "layer" else None, 1e-5,
        randn(rows, n_in) / n_in**0.5, randn(rows + 1)[:rows] if bias else None, activation,
    )


@pytest.mark.parametrize("activation", [None, "silu_and_mul", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize(("residual", "bias"), [(True, True), (False, False), (True, False)])
def test_norm_gemv_matches_the_composed_ops(norm: str, residual: bool, bias: bool, activation: str | None) -> None:
    """One launch = norm (+ residual add) -> linear (+ bias) -> activation, as the reference ops compose it;
    h = x + residual comes back and the residual passed in is left as it was."""
    from kernels import TORCH_OPS
    from kernels.gemv import norm_gemv

    for n_out, n_in, block_k in ((24, 100, 32), (37, 1030, None)):  # several K slices; outputs that fill no tile
        args = norm_linear_case(norm, residual, bias, activation, n_out, n_in)
        res_before = None if args[1] is None else args[1].clone()
        y, h = norm_gemv(*args, block_k=block_k)
        assert args[1] is None or torch.equal(args[1], res_before)
        ref_args = (args[0], None if args[1] is None else args[1].clone(), *args[2:])
        ref_y, ref_h = TORCH_OPS.norm_linear(*ref_args)
        torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
        assert y.shape == (1, n_out)


def test_norm_gemv_refuses_mismatched_inputs() -> None:
    from kernels.gemv import norm_gemv

    x, w = randn(1, 16), randn(8, 16)
    with pytest.raises(ValueError, match="norm weights"):
        norm_gemv(x, None, randn(15), None, 1e-5, w)
    with pytest.raises(ValueError, match="residual must match"):
        norm_gemv(x, randn(1, 15), randn(16), None, 1e-5, w)
    with pytest.raises(ValueError, match="activation must be"):
        norm_gemv(x, None, randn(16), None, 1e-5, w, None, "relu")
    with pytest.raises(ValueError, match="even number"):
        norm_gemv(x, None, randn(16), None, 1e-5, randn(7, 16), None, "silu_and_mul")


def test_injected_norm_linear_routes_one_row_to_the_fused_kernel() -> None:
    """The triton backend's norm_linear: one row in one fused launch, more rows through the separate ops;
    both agree with the torch backend."""
    from dataclasses import replace

    from kernels import TORCH_OPS, get_ops
    from kernels.gemv import norm_gemv

    fused_rows = []
    ops = get_ops("triton")
    assert ops.norm_linear_one_row is norm_gemv
    ops = replace(ops, norm_linear_one_row=lambda x, *a: fused_rows.append(x.shape[0]) or norm_gemv(x, *a))
    for rows in (1, 3):
        x, res = randn(rows, 48), randn(rows, 48)
        args = (randn(48), None, 1e-6, randn(2 * 20, 48), randn(40), "silu_and_mul")
        y, h = ops.norm_linear(x, res.clone(), *args)
        ref_y, ref_h = TORCH_OPS.norm_linear(x, res.clone(), *args)
        torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h, ref_h)
    assert fused_rows == [1]


def qkv_case(rotary: bool, slot: int, heads: tuple[int, int, int] = (4, 2, 16), n_in: int = 40):
    """norm_qkv_kv_write's inputs for one token at position 9 and cache ``slot`` (fresh zeroed caches)."""
    hq, hkv, d = heads
    rows = (hq + 2 * hkv) * d
    cos_sin = None
    if rotary:
        freqs = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    k_cache, v_cache = (torch.zeros(3, 4, hkv, d, device=DEVICE) for _ in range(2))
    return (randn(1, n_in), randn(1, n_in), 1 + 0.1 * randn(n_in), None, 1e-6, randn(rows, n_in) / n_in**0.5,
            randn(rows), heads, torch.tensor([9], device=DEVICE), cos_sin, k_cache, v_cache,
            torch.tensor([slot], device=DEVICE))


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("slot", [6, -1])  # a cache slot, and a padding token's "no write"
def test_norm_qkv_gemv_matches_the_composed_ops(rotary: bool, slot: int) -> None:
    """One launch = norm -> qkv projection -> rotary of q and k -> k and v into the cache slot."""
    from kernels import TORCH_OPS
    from kernels.gemv import norm_qkv_gemv

    args = qkv_case(rotary, slot)
    q, h = norm_qkv_gemv(*args)
    ref_args = list(qkv_case(rotary, slot))
    ref_q, ref_h = TORCH_OPS.norm_qkv_kv_write(*ref_args)
    torch.testing.assert_close(q, ref_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, ref_h)
    for cache, ref_cache in ((args[10], ref_args[10]), (args[11], ref_args[11])):
        torch.testing.assert_close(cache, ref_cache, atol=1e-4, rtol=1e-4)
        assert cache.abs().sum() > 0 if slot >= 0 else cache.abs().sum() == 0


def test_norm_qkv_gemv_refuses_partial_rotary_and_bad_heads() -> None:
    from kernels.gemv import norm_qkv_gemv

    args = list(qkv_case(True, 0))
    with pytest.raises(ValueError, match="qkv weight rows"):
        norm_qkv_gemv(*args[:7], (4, 1, 16), *args[8:])
    args[9] = args[9][:, :8]
    with pytest.raises(ValueError, match="whole heads"):
        norm_qkv_gemv(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("norm", "activation"), [("rms", None), ("rms", "silu_and_mul"), ("layer", "gelu_tanh")])
def test_norm_gemv_half_precision_on_gpu(dtype: torch.dtype, norm: str, activation: str | None) -> None:
    """Llama-3-8B / GPT-2 XL widths in half precision: the fused launch is as close to a float64 oracle as
    the separate kernels are."""
    from kernels import TORCH_OPS, get_ops

    n_in, n_out = (4096, 4096) if norm == "rms" else (1600, 6400)
    args = norm_linear_case(norm, True, norm == "layer", activation, n_out, n_in)
    half = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
    exact, _ = TORCH_OPS.norm_linear(*[a.double() if isinstance(a, torch.Tensor) else a for a in half])
    fused, _ = get_ops("triton").norm_linear(*half)
    unfused, _ = TORCH_OPS.norm_linear(*[a.clone() if isinstance(a, torch.Tensor) else a for a in half])
    assert (fused.double() - exact).abs().max() <= 1.5 * (unfused.double() - exact).abs().max() + 1e-3
