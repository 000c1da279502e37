"""RMSNorm and LayerNorm (+ residual) Triton kernels against their torch references.

On a machine without CUDA the kernels run on the Triton interpreter (tests/kernels/conftest.py sets
TRITON_INTERPRET); with CUDA the same small odd shapes run compiled, and the `gpu` tests add full
Llama-3-8B-sized batches in float16 and bfloat16.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import TORCH_OPS, get_ops
from kernels.layer_norm import layer_norm, layer_norm_ref
from kernels.rms_norm import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),  # about 2 ulp: float32 statistics summed in another order
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
TOKENS = (1, 7, 129, 300)
HIDDEN = (48, 64, 96, 200)


def make(tokens: int, hidden: int, dtype: torch.dtype = torch.float32, device: str = DEVICE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(tokens, hidden, generator=g) for _ in range(2))
    w, b = 1 + 0.5 * torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    return (t.to(device, dtype) for t in (x, res, w, b))


def norm_pair(kind: str):
    """(kernel, reference) as f(x, w, b, residual=None): one test body for both norms."""
    if kind == "rms":
        return tuple(lambda x, w, b, r=None, f=f: f(x, w, 1e-6, r) for f in (rms_norm, rms_norm_ref))
    return tuple(lambda x, w, b, r=None, f=f: f(x, w, b, 1e-5, r) for f in (layer_norm, layer_norm_ref))


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_norm_matches_reference(kind: str, tokens: int, hidden: int) -> None:
    kernel, ref = norm_pair(kind)
    x, _, w, b = make(tokens, hidden)
    torch.testing.assert_close(kernel(x, w, b), ref(x, w, b), **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_norm_with_residual_matches_reference(kind: str, tokens: int, hidden: int) -> None:
    kernel, ref = norm_pair(kind)
    x, res, w, b = make(tokens, hidden)
    res_k, res_r = res.clone(), res.clone()
    y_k, out_k = kernel(x, w, b, res_k)
    y_r, out_r = ref(x, w, b, res_r)
    torch.testing.assert_close(y_k, y_r, **TOL[torch.float32])
    torch.testing.assert_close(out_k, out_r, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_residual_is_updated_in_place_and_x_is_untouched(kind: str, backend: str) -> None:
    """The contract both backends share: residual <- x + residual in place; the returned residual IS it."""
    fn = norm_pair(kind)[0 if backend == "kernel" else 1]
    x, res, w, b = make(7, 96)
    x_before, res_before = x.clone(), res.clone()
    y, out = fn(x, w, b, res)
    assert out is res
    torch.testing.assert_close(res, x_before + res_before, atol=0, rtol=0)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)
    torch.testing.assert_close(y, norm_pair(kind)[1](x_before + res_before, w, b), **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_strided_and_batched_inputs(kind: str) -> None:
    """x a column slice of a wider tensor, 3-D inputs, and a residual that is not viewable as rows."""
    kernel, ref = norm_pair(kind)
    _, _, w, b = make(1, 96)
    wide = torch.randn(129, 300, device=DEVICE)
    x = wide[:, 100:196]
    torch.testing.assert_close(kernel(x, w, b), ref(x, w, b), **TOL[torch.float32])
    x3, r3 = torch.randn(3, 43, 96, device=DEVICE), torch.randn(3, 43, 96, device=DEVICE)
    torch.testing.assert_close(kernel(x3, w, b), ref(x3, w, b), **TOL[torch.float32])
    res_t = torch.randn(96, 43, device=DEVICE).t()  # stride(-1) != 1: the launcher works on a copy
    expected = res_t + x3[0]
    y, out = kernel(x3[0], w, b, res_t)
    assert out is res_t
    torch.testing.assert_close(res_t, expected, atol=0, rtol=0)
    torch.testing.assert_close(y, ref(expected, w, b), **TOL[torch.float32])
    y3, out3 = kernel(x3, w, b, r3.clone())
    torch.testing.assert_close(y3, ref(x3 + r3, w, b), **TOL[torch.float32])


def test_empty_batch() -> None:
    x, res, w, b = make(0, 64)
    assert rms_norm(x, w, 1e-6).shape == (0, 64)
    assert layer_norm(x, w, b, 1e-5, res)[0].shape == (0, 64)


def test_registry_swaps_in_the_kernels() -> None:
    ops = get_ops("triton")
    assert ops.rms_norm is rms_norm and ops.layer_norm is layer_norm
    assert TORCH_OPS.rms_norm is rms_norm_ref and TORCH_OPS.layer_norm is layer_norm_ref


def test_import_kernels_without_triton_falls_back_to_references() -> None:
    """Where triton is missing, ``import kernels`` works and the triton backend is the references."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels\n"
        "ops, ref = kernels.get_ops('triton'), kernels.TORCH_OPS\n"
        "names = ['rms_norm', 'layer_norm', 'qkv_kv_write', 'linear', 'linear_act']\n"
        "assert all(getattr(ops, n) is getattr(ref, n) for n in names), kernels.triton_ops_available()\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_full_size_on_gpu(kind: str, dtype: torch.dtype, with_residual: bool) -> None:
    kernel, ref = norm_pair(kind)
    x, res, w, b = make(8192 + 13, 4096, dtype, "cuda")
    if not with_residual:
        torch.testing.assert_close(kernel(x, w, b), ref(x, w, b), **TOL[dtype])
        return
    res_k, res_r = res.clone(), res.clone()
    y_k, _ = kernel(x, w, b, res_k)
    y_r, _ = ref(x, w, b, res_r)
    torch.testing.assert_close(y_k, y_r, **TOL[dtype])
    torch.testing.assert_close(res_k, res_r, atol=0, rtol=0)
