"""Rotary, KV write and the fused rotary + KV write Triton kernels against their torch references,
and the fused op wired into a Llama (and the other kernels into a GPT-2) end to end.

q, k and v are strided views of one fused qkv tensor, as the models produce them; caches are filled
with noise first, so a write to a wrong slot (or to a padding token's) shows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import TORCH_OPS, get_ops
from kernels.kv_write import kv_write, kv_write_ref
from kernels.rotary import rotary, rotary_kv_write, rotary_kv_write_ref, rotary_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# (tokens, q heads, kv heads, head_dim, rot_dim): odd head counts and dims, partial rotary, MQA
SHAPES = [
    (1, 4, 4, 64, 64),
    (7, 6, 2, 40, 24),
    (129, 8, 1, 96, 96),
    (300, 5, 5, 48, 32),
    (129, 12, 4, 80, 20),
]


def cos_sin_cache(max_pos: int, rot_dim: int, device: str = DEVICE) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def qkv(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype = torch.float32, device: str = DEVICE):
    """Views of one [T, (Hq + 2 Hkv) * D] tensor, like LlamaAttention's split of qkv_proj's output."""
    g = torch.Generator().manual_seed(tokens)
    fused = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)


def caches(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype = torch.float32, device=DEVICE):
    k_cache = torch.randn(num_blocks, block_size, hkv, d).to(device, dtype)
    return k_cache, torch.randn_like(k_cache)


def slots(tokens: int, num_blocks: int, block_size: int, device: str = DEVICE, seed: int = 0) -> torch.Tensor:
    """Distinct random slots, every fifth token a padding token (-1)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    s[::5] = -1
    return s.to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotary_matches_reference(shape: tuple[int, ...]) -> None:
    tokens, hq, hkv, d, rot = shape
    q, k, _ = qkv(tokens, hq, hkv, d)
    q_before, k_before = q.clone(), k.clone()
    positions = torch.randint(0, 1000, (tokens,)).to(DEVICE)
    cache = cos_sin_cache(1000, rot)
    q_k, k_k = rotary(positions, q, k, cache)
    q_r, k_r = rotary_ref(positions, q, k, cache)
    torch.testing.assert_close(q_k, q_r, **TOL[torch.float32])
    torch.testing.assert_close(k_k, k_r, **TOL[torch.float32])
    torch.testing.assert_close(q, q_before, atol=0, rtol=0)
    torch.testing.assert_close(k, k_before, atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kv_write_matches_reference(shape: tuple[int, ...], block_size: int) -> None:
    tokens, _, hkv, d, _ = shape
    _, k, v = qkv(tokens, 1, hkv, d)
    num_blocks = tokens // block_size + 3
    k_cache, v_cache = caches(num_blocks, block_size, hkv, d)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots(tokens, num_blocks, block_size)
    kv_write(k, v, k_cache, v_cache, slot_mapping)
    kv_write_ref(k, v, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotary_kv_write_matches_reference(shape: tuple[int, ...], block_size: int) -> None:
    tokens, hq, hkv, d, rot = shape
    q, k, v = qkv(tokens, hq, hkv, d)
    inputs_before = [t.clone() for t in (q, k, v)]
    positions = torch.randint(0, 1000, (tokens,)).to(DEVICE)
    cache = cos_sin_cache(1000, rot)
    num_blocks = tokens // block_size + 3
    k_cache, v_cache = caches(num_blocks, block_size, hkv, d)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots(tokens, num_blocks, block_size)
    q_k = rotary_kv_write(positions, q, k, v, cache, k_cache, v_cache, slot_mapping)
    q_r = rotary_kv_write_ref(positions, q, k, v, cache, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(q_k, q_r, **TOL[torch.float32])
    torch.testing.assert_close(k_cache, k_ref, **TOL[torch.float32])
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)
    for t, before in zip((q, k, v), inputs_before, strict=True):
        torch.testing.assert_close(t, before, atol=0, rtol=0)


def test_rotary_kv_write_ref_is_rotary_then_kv_write() -> None:
    q, k, v = qkv(9, 4, 2, 32)
    positions, cache = torch.arange(9, device=DEVICE), cos_sin_cache(16, 32)
    k_cache, v_cache = caches(2, 16, 2, 32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots(9, 2, 16)
    q_fused = rotary_kv_write_ref(positions, q, k, v, cache, k_cache, v_cache, slot_mapping)
    q_rot, k_rot = rotary_ref(positions, q, k, cache)
    kv_write_ref(k_rot, v, k_ref, v_ref, slot_mapping)
    assert torch.equal(q_fused, q_rot) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_writes_into_a_strided_cache_view() -> None:
    """Caches that are the K and V halves of one [num_blocks, 2, block_size, Hkv, D] tensor."""
    q, k, v = qkv(33, 4, 2, 40)
    positions, cache = torch.arange(33, device=DEVICE), cos_sin_cache(64, 40)
    pool = torch.randn(5, 2, 16, 2, 40, device=DEVICE)
    ref = pool.clone()
    slot_mapping = slots(33, 5, 16)
    q_k = rotary_kv_write(positions, q, k, v, cache, pool[:, 0], pool[:, 1], slot_mapping)
    q_r = rotary_kv_write_ref(positions, q, k, v, cache, ref[:, 0], ref[:, 1], slot_mapping)
    torch.testing.assert_close(q_k, q_r, **TOL[torch.float32])
    torch.testing.assert_close(pool, ref, **TOL[torch.float32])
    kv_write(k, v, pool[:, 0], pool[:, 1], slot_mapping)
    kv_write_ref(k, v, ref[:, 0], ref[:, 1], slot_mapping)
    torch.testing.assert_close(pool, ref, atol=0, rtol=0)


def test_tiles_smaller_than_one_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tiles: the kernels loop over head blocks (the last one partly masked), as wide models do."""
    import kernels.kv_write
    import kernels.rotary

    monkeypatch.setattr(kernels.rotary, "TILE", 8)
    monkeypatch.setattr(kernels.kv_write, "TILE", 8)
    tokens, hq, hkv, d, rot = 7, 6, 3, 40, 24
    q, k, v = qkv(tokens, hq, hkv, d)
    positions, cache = torch.arange(tokens, device=DEVICE) * 3, cos_sin_cache(32, rot)
    for got, want in zip(rotary(positions, q, k, cache), rotary_ref(positions, q, k, cache), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    k_cache, v_cache = caches(2, 16, hkv, d)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots(tokens, 2, 16)
    kv_write(k, v, k_cache, v_cache, slot_mapping)
    kv_write_ref(k, v, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    q_k = rotary_kv_write(positions, q, k, v, cache, k_cache, v_cache, slot_mapping)
    q_r = rotary_kv_write_ref(positions, q, k, v, cache, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(q_k, q_r, **TOL[torch.float32])
    torch.testing.assert_close(k_cache, k_ref, **TOL[torch.float32])
    assert torch.equal(v_cache, v_ref)


OURS = ("rms_norm", "layer_norm", "qkv_kv_write", "linear_act")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_generates_the_same_tokens_with_these_kernels(family: str, make_checkpoint: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The references vs these kernels (attention stays the reference) through the whole engine, a batch of two
    (prompts and decode through cuBLAS, then the rotary + KV-write and activation kernels) and one sequence alone
    (its decode steps through the one-row projections with those in their epilogues). Llama runs RMSNorm +
    residual, rotary + KV write and SiLU-and-mul; GPT-2 LayerNorm, KV write and GELU."""
    pytest.importorskip("transformers")
    Engine = pytest.importorskip("engine.engine").Engine  # the engine's own dependencies (pydantic, ...)
    from engine import model_runner
    from engine.config import EngineConfig
    from engine.request import SamplingParams

    ckpt: Path = make_checkpoint(family)
    triton_ops = get_ops("triton")
    ours = replace(TORCH_OPS, **{name: getattr(triton_ops, name) for name in OURS})
    prompts, sampling = [[5, 17, 300, 2, 44, 9, 130], [7] * 20], SamplingParams(max_new_tokens=4, ignore_eos=True)
    cfg = EngineConfig(model=str(ckpt), dtype="float32", block_size=16, num_kv_blocks=8, device=DEVICE,
                       replace_with_kernel_inject=False)
    reference = Engine(cfg)
    expected = [out.token_ids for out in reference.generate(prompts, sampling)]
    expected_alone = reference.generate(prompts[:1], sampling)[0].token_ids
    monkeypatch.setattr(model_runner, "get_ops", lambda backend, pdl=False: ours)
    engine = Engine(cfg)
    assert [out.token_ids for out in engine.generate(prompts, sampling)] == expected
    assert engine.generate(prompts[:1], sampling)[0].token_ids == expected_alone


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [128, 64], ids=["full", "partial"])
def test_llama3_8b_shapes_on_gpu(dtype: torch.dtype, rot_dim: int) -> None:
    """8k+ tokens of Llama-3-8B (32 q heads, 8 kv heads, head_dim 128), block size 16."""
    tokens, hq, hkv, d, block_size = 8192 + 7, 32, 8, 128, 16
    q, k, v = qkv(tokens, hq, hkv, d, dtype, "cuda")
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    cache = cos_sin_cache(8192, rot_dim, "cuda")
    q_k, k_k = rotary(positions, q, k, cache)
    q_r, k_r = rotary_ref(positions, q, k, cache)
    torch.testing.assert_close(q_k, q_r, **TOL[dtype])
    torch.testing.assert_close(k_k, k_r, **TOL[dtype])
    num_blocks = tokens // block_size + 64
    k_cache, v_cache = caches(num_blocks, block_size, hkv, d, dtype, "cuda")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = slots(tokens, num_blocks, block_size, "cuda")
    kv_write(k, v, k_cache, v_cache, slot_mapping)
    kv_write_ref(k, v, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    q_k = rotary_kv_write(positions, q, k, v, cache, k_cache, v_cache, slot_mapping)
    q_r = rotary_kv_write_ref(positions, q, k, v, cache, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(q_k, q_r, **TOL[dtype])
    torch.testing.assert_close(k_cache, k_ref, **TOL[dtype])
    assert torch.equal(v_cache, v_ref)
