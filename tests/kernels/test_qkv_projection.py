"""The attention block's entry, qkv projection + rotary + KV-cache write, against the composed references
(interpreter on CPU, compiled on CUDA): one row in one launch, more rows through cuBLAS and the rotary kernel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kernels import TORCH_OPS, get_ops
from kernels.qkv_projection import qkv_kv_write, qkv_kv_write_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def block_inputs(hq: int, hkv: int, d: int, hidden: int, rows: int = 1, rot_dim: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    out = (hq + 2 * hkv) * d
    inputs = dict(x=r(rows, hidden), weight=r(out, hidden) / hidden**0.5, bias=r(out) if bias else None,
                  num_heads=hq, num_kv_heads=hkv, k_cache=r(6, 8, hkv, d), v_cache=r(6, 8, hkv, d),
                  slot_mapping=torch.randperm(48, generator=g)[:rows].to(DEVICE),
                  positions=torch.randint(0, 64, (rows,), generator=g).to(DEVICE), cos_sin_cache=None)
    if rot_dim is not None:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
        freqs = torch.outer(torch.arange(64).float(), inv_freq)
        inputs["cos_sin_cache"] = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    return inputs


def run_both(inputs: dict[str, Any], **launch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(q, k_cache, v_cache) of the kernel and of the reference, each on its own copy of the caches."""
    mine = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
    ref = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
    q = qkv_kv_write(**mine, **launch)
    q_ref = qkv_kv_write_ref(**ref)
    return [q, mine["k_cache"], mine["v_cache"]], [q_ref, ref["k_cache"], ref["v_cache"]]


@pytest.mark.parametrize(("hq", "hkv", "d", "hidden"), [(4, 2, 16, 40), (3, 3, 8, 24), (6, 1, 32, 96)])
@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "gpt2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_pairs", [1, 4])
def test_one_row_matches_the_composed_references(hq: int, hkv: int, d: int, hidden: int, rotary: bool, bias: bool,
                                                 block_pairs: int) -> None:
    """GQA / MHA / MQA, with and without rotary and bias, tiles that do and do not divide the pairs."""
    inputs = block_inputs(hq, hkv, d, hidden, rot_dim=d if rotary else None, bias=bias)
    got, want = run_both(inputs, block_pairs=block_pairs, block_k=16)
    assert got[0].shape == (1, hq, d)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got[1], inputs["k_cache"]) and not torch.equal(got[2], inputs["v_cache"])


def test_a_padding_slot_writes_no_cache() -> None:
    inputs = block_inputs(4, 2, 16, 40, rot_dim=16)
    inputs["slot_mapping"] = torch.tensor([-1], device=DEVICE)
    got, want = run_both(inputs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], inputs["k_cache"]) and torch.equal(got[2], inputs["v_cache"])


@pytest.mark.parametrize(("rows", "rot_dim"), [(5, 16), (1, 8)], ids=["prompt", "partial-rotary"])
def test_more_rows_and_partial_rotary_take_the_separate_kernels(rows: int, rot_dim: int) -> None:
    got, want = run_both(block_inputs(4, 2, 16, 40, rows=rows, rot_dim=rot_dim, bias=True))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused() -> None:
    inputs = block_inputs(4, 2, 16, 40, rot_dim=16)
    with pytest.raises(ValueError, match="qkv weight has 128 rows"):
        qkv_kv_write(**{**inputs, "num_kv_heads": 1})
    with pytest.raises(ValueError, match="KV cache must be"):
        qkv_kv_write(**{**inputs, "k_cache": inputs["k_cache"][:, :, :1]})
    with pytest.raises(ValueError, match="rotary needs positions"):
        qkv_kv_write(**{**inputs, "positions": None})


def test_registry_swaps_in_the_kernel() -> None:
    assert get_ops("triton").qkv_kv_write is qkv_kv_write
    assert TORCH_OPS.qkv_kv_write is qkv_kv_write_ref


@pytest.mark.gpu
@pytest.mark.parametrize(("hq", "hkv", "d", "hidden", "rotary", "dtype"), [
    (32, 8, 128, 4096, True, torch.bfloat16),  # Llama-3-8B
    (25, 25, 64, 1600, False, torch.float16),  # GPT-2 XL
])
def test_model_shapes_on_gpu(hq: int, hkv: int, d: int, hidden: int, rotary: bool, dtype: torch.dtype) -> None:
    got, want = run_both(block_inputs(hq, hkv, d, hidden, rot_dim=d if rotary else None, bias=not rotary,
                                      dtype=dtype))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)
