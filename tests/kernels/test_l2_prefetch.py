"""The L2 prefetch hint: it changes no result (interpreter on CPU, where it is off; compiled on CUDA, where the
PTX prefetches run), and its launch arguments."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import gemv
from kernels.l2_prefetch import MAX_RANGES, L2Prefetch, prefetch_meta
from kernels.qkv_projection import qkv_kv_write

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def test_hint_validates_its_ranges() -> None:
    t = torch.zeros(10, 4)  # 160 bytes
    assert L2Prefetch.of(t) == (t.data_ptr(), 160)
    assert L2Prefetch.of(t, 32, 64) == (t.data_ptr() + 32, 64)
    with pytest.raises(ValueError, match="bytes"):
        L2Prefetch.of(t, 100, 100)
    with pytest.raises(ValueError, match="contiguous"):
        L2Prefetch.of(t.t())
    with pytest.raises(ValueError, match="at most"):
        L2Prefetch(((1, 1),) * (MAX_RANGES + 1))
    with pytest.raises(ValueError, match=">= 0"):
        L2Prefetch(((1, -1),))


def test_launch_arguments_are_on_only_for_cuda_and_padded() -> None:
    hint = L2Prefetch(((4096, 1000), (8192, 0)))
    assert prefetch_meta(hint, torch.device("cpu")) == {"PREFETCH": False, "pf0": 0, "pf0_bytes": 0, "pf1": 0,
                                                         "pf1_bytes": 0, "pf2": 0, "pf2_bytes": 0}
    on = prefetch_meta(hint, torch.device("cuda"))
    assert on["PREFETCH"] and (on["pf0"], on["pf0_bytes"]) == (4096, 1000) and on["pf1_bytes"] == on["pf2_bytes"] == 0
    assert not prefetch_meta(None, torch.device("cuda"))["PREFETCH"]
    assert not prefetch_meta(L2Prefetch(((4096, 0),)), torch.device("cuda"))["PREFETCH"]  # nothing to fetch


def _hint(*tensors: torch.Tensor) -> L2Prefetch:
    """Odd ranges: a whole tensor, a piece that is not a whole number of lines, and a few bytes."""
    a, b, c = tensors
    return L2Prefetch((L2Prefetch.of(a), L2Prefetch.of(b, 256, 1000), L2Prefetch.of(c, 0, 2)))


@pytest.mark.parametrize("activation", [None, "gelu_tanh", "silu_and_mul"])
def test_gemv_with_a_hint_gives_what_it_gives_without(activation: str | None) -> None:
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    x, w, b = randn(1, 320, dtype=dtype), randn(96, 320, dtype=dtype), randn(96, dtype=dtype)
    others = (randn(640, 320, dtype=dtype), randn(64, 64, dtype=dtype), randn(8, dtype=dtype))
    want = gemv(x, w, b, activation=activation)
    got = gemv(x, w, b, activation=activation, prefetch=_hint(*others))
    assert torch.equal(got, want)


def test_qkv_projection_with_a_hint_gives_what_it_gives_without() -> None:
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    heads, kv_heads, d = 4, 2, 16
    x, w = randn(1, 64, dtype=dtype), randn((heads + 2 * kv_heads) * d, 64, dtype=dtype)
    caches = [torch.zeros(2, 3, 8, kv_heads, d, dtype=dtype, device=DEVICE) for _ in range(2)]
    slot = torch.tensor([5], device=DEVICE)
    qs = [qkv_kv_write(x, w, None, heads, kv_heads, kc, vc, slot, prefetch=hint)
          for (kc, vc), hint in zip(caches, (None, _hint(randn(3, 40, dtype=dtype), w, x)), strict=True)]
    assert torch.equal(qs[0], qs[1])
    assert torch.equal(caches[0], caches[1])


@pytest.mark.gpu
def test_hint_in_a_graph_of_pdl_launches_on_gpu() -> None:
    """Many programs, each with a share of a few bytes or none; inside a CUDA graph with PDL; weights that the
    graph's own launches read, prefetched by the launch before them."""
    x = randn(1, 1600, dtype=torch.float16)
    w1, w2 = randn(6400, 1600, dtype=torch.float16) * 0.02, randn(1600, 6400, dtype=torch.float16) * 0.02
    tiny = randn(3, 40, dtype=torch.float16)

    def chain(hinted: bool) -> torch.Tensor:
        h = gemv(x, w1, activation="gelu_tanh", pdl=True,
                 prefetch=L2Prefetch((L2Prefetch.of(w2), L2Prefetch.of(tiny, 0, 16))) if hinted else None)
        return gemv(h, w2, pdl=True, prefetch=L2Prefetch((L2Prefetch.of(w1),)) if hinted else None)

    want = chain(False)
    assert torch.equal(chain(True), want)
    chain(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
