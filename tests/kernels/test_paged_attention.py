"""Paged attention: the Triton kernel (interpreter on CPU, the real thing on GPU) against paged_attention_ref."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import triton

from kernels import get_ops
from kernels import paged_attention_triton as pa
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_triton import TileConfig, choose_kv_splits, paged_attention

TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
# small-shape tests: float32 in the interpreter; the serving dtype on a GPU (float32 there is one test, below,
# because ieee-precision float32 dots compile slowly)
SMALL_DTYPE = torch.float32 if INTERPRETED else torch.float16


def make_batch(q_lens: list[int], context_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype = SMALL_DTYPE, device: str = DEVICE,
               seed: int = 0) -> dict[str, Any]:
    """A batch whose sequence b has context_lens[b] cached tokens then q_lens[b] new ones (also cached).

    Block ids are a random permutation of a pool with spare blocks, so tables are shuffled and
    non-contiguous; rows are padded with 0 past each sequence's blocks, as the engine pads them.
    """
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, q_lens, strict=True)]
    num_blocks = [-(-s // block_size) for s in seq_lens]
    pool = sum(num_blocks) + 5
    ids = torch.randperm(pool, generator=g).to(torch.int32)
    tables = torch.zeros(len(q_lens), max(num_blocks) + 2, dtype=torch.int32)
    used = 0
    for b, n in enumerate(num_blocks):
        tables[b, :n] = ids[used : used + n]
        used += n
    rand = torch.Generator(device).manual_seed(seed)
    cache_shape = (pool, block_size, num_kv_heads, head_dim)
    return dict(
        q=torch.randn(sum(q_lens), num_q_heads, head_dim, generator=rand, device=device, dtype=dtype),
        k_cache=torch.randn(cache_shape, generator=rand, device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, generator=rand, device=device, dtype=dtype),
        block_tables=tables.to(device),
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(device, torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


def check(batch: dict[str, Any], **kwargs: Any) -> None:
    q = batch["q"]
    lens = batch["query_start_loc"].diff()
    hints: dict[str, Any] = dict(max_query_len=int(lens.max()), max_seq_len=int(batch["seq_lens"].max()))
    expected = paged_attention_ref(**batch)
    got = paged_attention(**batch, **hints, **kwargs)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, **TOL[q.dtype])


# --- CPU (interpreter) and GPU: small shapes --------------------------------------------------------

MIXED = ([1, 37, 1, 90, 5], [0, 0, 130, 211, 15])  # decode tokens and prompt chunks, ragged, up to 301 keys


@pytest.mark.parametrize("heads,head_dim,block_size", [
    ((8, 2), 64, 16), ((8, 2), 80, 32), ((4, 1), 80, 16), ((4, 4), 64, 32),
], ids=["gqa4-d64-bs16", "gqa4-d80-bs32", "mqa-d80-bs16", "mha-d64-bs32"])
def test_mixed_batch(heads: tuple[int, int], head_dim: int, block_size: int) -> None:
    """Prompt chunks take 128-row tiles; the decode tokens of the same launch take 16-row ones."""
    check(make_batch(*MIXED, *heads, head_dim, block_size))


@pytest.mark.parametrize("splits,head_dim", [(1, 64), (2, 80), (8, 64)])
def test_decode_batch_split_kv(splits: int, head_dim: int) -> None:
    """Decode-only batch; with 8 splits the 3- and 20-token sequences leave some segments empty."""
    check(make_batch([1] * 4, [299, 2, 160, 19], 8, 2, head_dim, 16, seed=splits), num_kv_splits=splits)


def test_split_kv_with_prompt_chunks() -> None:
    """The split path is general: prompt rows whose causal range ends before a segment get nothing from it."""
    check(make_batch([40, 1, 3], [60, 150, 0], 4, 1, 64, 32), num_kv_splits=4)


def _counters(device: torch.device) -> torch.Tensor:
    """The split-KV arrival counters the launcher hands the kernel now (the newest buffer)."""
    return pa._COUNTERS[device][-1]


def test_split_kv_counters_reset_themselves() -> None:
    """The last split program of each tile sets its counter back to 0, so a second launch merges too."""
    batch = make_batch([1, 1, 1], [150, 40, 77], 8, 2, 64, 16)
    for _ in range(2):
        check(batch, num_kv_splits=4)
        assert not _counters(batch["q"].device).any()


def test_split_kv_all_but_one_segment_empty() -> None:
    """3 keys over 8 splits: segments 1..7 of that sequence are empty (m = -inf) and must drop out of the merge,
    next to a long sequence whose 8 segments all hold keys."""
    check(make_batch([1, 1], [2, 300], 8, 2, 64, 16), num_kv_splits=8)


@pytest.mark.parametrize("min_keys", [16, 64, 4096])
def test_split_kv_uses_only_the_splits_a_context_fills(monkeypatch: pytest.MonkeyPatch, min_keys: int) -> None:
    """A launch sized for long contexts (a CUDA graph's) gives a short one only the splits it fills with at
    least MIN_KEYS_PER_ACTIVE_SPLIT keys: 4096 leaves every sequence one split, 16 spreads 300 keys over all 16;
    the merge reads just those, and each tile's counter is back at 0 after the launch."""
    monkeypatch.setattr(pa, "MIN_KEYS_PER_ACTIVE_SPLIT", min_keys)
    batch = make_batch([1, 1, 1], [2, 70, 300], 8, 2, 64, 16)
    check(batch, num_kv_splits=16)
    assert not _counters(batch["q"].device).any()


def test_split_kv_merge_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge reads 2 splits of every head a step; 6 query heads a kv head leave 2 padding heads of 8 masked."""
    monkeypatch.setattr(pa, "MERGE_ELEMS", 2 * 8 * 64)
    check(make_batch([1, 2, 1], [2, 40, 300], 12, 2, 64, 16), num_kv_splits=8)


def test_split_kv_counter_buffer_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch with more query tiles than the buffer holds counters for grows it; the unsplit path takes none."""
    monkeypatch.setattr(pa, "_COUNTERS", {})
    small, large = make_batch([1], [40], 4, 1, 64, 16), make_batch([1] * 6, [90, 3, 200, 45, 130, 7], 8, 2, 64, 16)
    device = small["q"].device
    check(small, num_kv_splits=1)
    assert device not in pa._COUNTERS
    check(small, num_kv_splits=2)
    held = _counters(device).numel()
    check(large, num_kv_splits=2)
    grown = _counters(device)
    assert grown.numel() > held and not grown.any()


@pytest.mark.parametrize("q_len", [300, 1, 2])
def test_single_sequence_from_empty_cache(q_len: int) -> None:
    check(make_batch([q_len], [0], 4, 1, 64, 16))


def test_sequence_without_new_tokens() -> None:
    """A sequence with no new tokens owns one tile id that does nothing; its neighbours are unaffected."""
    check(make_batch([3, 0, 1, 0], [10, 20, 30, 5], 4, 1, 64, 16))


def test_small_tiles_cross_many_tile_boundaries() -> None:
    """16-row query tiles and 16-key steps: many masked/unmasked boundaries and tiles per sequence."""
    check(make_batch([33, 1, 20], [17, 40, 0], 4, 1, 80, 16), config=TileConfig(16, 16, 4, 2))


def test_group_that_is_not_a_power_of_two() -> None:
    """6 query heads on 2 kv heads: 3 rows per token, a 16-row tile holds 5 tokens and one dead row."""
    check(make_batch([1, 23, 1], [40, 9, 77], 6, 2, 64, 16), config=TileConfig(16, 32, 4, 2))


def test_float32() -> None:
    """float32 keeps float32 dots (ieee, not tf32) on a GPU."""
    check(make_batch([1, 2, 1], [20, 0, 33], 4, 1, 64, 16, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        INTERPRETED, reason="the Triton interpreter's tl.dot reads bf16 (stored as uint16) as integers")),
])
def test_half_precision(dtype: torch.dtype) -> None:
    check(make_batch([1, 20, 1], [70, 13, 5], 4, 1, 64, 16, dtype=dtype), num_kv_splits=1)
    check(make_batch([1, 1], [200, 33], 4, 1, 64, 16, dtype=dtype), num_kv_splits=4)


def test_hints_are_optional_and_q_may_be_a_view() -> None:
    """Without max_query_len/max_seq_len the launcher reads them itself; q may be a strided view of qkv."""
    batch = make_batch([1, 12, 1], [30, 4, 60], 4, 2, 64, 16)
    qkv = torch.cat([batch["q"], torch.zeros_like(batch["q"])], dim=1)
    batch["q"] = qkv[:, :4]
    torch.testing.assert_close(paged_attention(**batch), paged_attention_ref(**batch), **TOL[SMALL_DTYPE])


def test_registered_under_the_triton_backend() -> None:
    batch = make_batch([1, 9], [20, 30], 4, 1, 64, 16)
    hints: dict[str, Any] = dict(max_query_len=9, max_seq_len=39)
    got = get_ops("triton").paged_attention(**batch, **hints)
    torch.testing.assert_close(got, get_ops("torch").paged_attention(**batch, **hints), **TOL[SMALL_DTYPE])


def test_split_choice() -> None:
    h100 = 132
    assert choose_kv_splits(1, 8, 1, 32768, h100) == 16  # 8 programs, long context: split, at most 16 ways
    assert choose_kv_splits(1, 25, 1, 1024, h100) == 16  # GPT-2 XL's graph: its context allows 16 splits of 64
    assert choose_kv_splits(4, 8, 1, 4096, h100) == 16
    assert choose_kv_splits(16, 8, 1, 4096, h100) == 4
    assert choose_kv_splits(64, 8, 1, 4096, h100) == 1  # already 512 programs
    assert choose_kv_splits(1, 8, 7, 32768, h100) == 1  # a prompt chunk in the batch: no split
    assert choose_kv_splits(1, 8, 1, 100, h100) == 1  # too short to be worth splitting


def _compile_for_h100(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], **options: int) -> Any:
    """Compile to a cubin for sm_90 without a GPU, with the 16-byte alignment a real launch specialises on."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: pointers.get(name, "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    if "qk_scale" in signature:
        signature["qk_scale"] = "fp32"
    aligned = [n for n in kernel.arg_names if n in pointers or (n.startswith("stride_") and n != "stride_bt")]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def build_for_h100(dtype: str, head_dim: int, block_m: int, block_n: int, splits: int, warps: int, pdl: bool) -> None:
    """Compile the kernel for sm_90 and check that the K/V loads are software-pipelined (asynchronous copies
    into shared memory), that a split program's arrival is an acq_rel atomic of gpu scope (the merge's
    memory ordering, which the interpreter cannot test), and that with PDL the kernel stores nothing and
    copies no K/V before it waits for the kernels before it (it may look up its sequence there). Needs
    TRITON_INTERPRET unset: test_compiles_for_h100 runs it in a child."""
    ptr, part = f"*{dtype}", "*fp32" if splits > 1 else f"*{dtype}"
    pointers = dict(out=ptr, part_acc=part, part_ml=part, counters="*i32" if splits > 1 else ptr, q=ptr,
                    k_cache=ptr, v_cache=ptr, block_tables="*i32", query_start_loc="*i32", seq_lens="*i32")
    d_pad = triton.next_power_of_2(head_dim)
    constexprs = dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=16, BLOCK_M=block_m,
                      BLOCK_Q=block_m // 4, SMALL_M=16, BLOCK_N=block_n, NUM_SPLITS=splits,
                      MERGE_CHUNK=min(splits, pa.MERGE_ELEMS // (4 * d_pad)), DOT_PRECISION="tf32", PDL=pdl)
    compiled = _compile_for_h100(pa._paged_attention_kernel, pointers, constexprs, num_warps=warps, num_stages=3)
    assert compiled.asm["cubin"]
    assert "async_copy_global_to_local" in compiled.asm["ttgir"], "K/V loads are no longer pipelined"
    ptx = compiled.asm["ptx"]
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (splits > 1)
    assert ("griddepcontrol.wait" in ptx) == pdl
    if pdl:
        before_wait = ptx[:ptx.index("griddepcontrol.wait")]
        assert "st.global" not in before_wait and "atom." not in before_wait and "cp.async" not in before_wait
        assert "ld.global" in before_wait  # the sequence lookup: step metadata only


def _triton_has_cuda_backend() -> bool:
    return "nvidia" in importlib.import_module("triton.backends").backends


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the other tests compile the kernels")
@pytest.mark.skipif(not _triton_has_cuda_backend(), reason="this triton build has no CUDA backend to compile with")
@pytest.mark.parametrize("case", [("bf16", 128, 16, 32, 8, 4, True), ("fp16", 80, 128, 64, 1, 8, False)],
                         ids=["decode-split-pdl", "prefill"])
def test_compiles_for_h100(case: tuple[Any, ...]) -> None:
    """The interpreter runs the Python, not the compiler: build the real sm_90 code too (no GPU needed),
    in a child process where triton is imported without TRITON_INTERPRET."""
    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(Path(__file__).parent)!r}]; "
            f"import test_paged_attention as t; t.build_for_h100(*{case!r})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


# --- GPU: full shapes -------------------------------------------------------------------------------

LLAMA3_8B: dict[str, Any] = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_mixed_batch_long(dtype: torch.dtype, head_dim: int) -> None:
    q_lens = [1, 1, 517, 1, 1000, 1, 3, 1]
    context_lens = [4096, 0, 3580, 17, 0, 2047, 500, 4000]
    check(make_batch(q_lens, context_lens, 32, 8, head_dim, 16, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("splits", [None, 4])
def test_gpu_decode_batch64_4k(dtype: torch.dtype, splits: int | None) -> None:
    lens = [4096 - 37 * i for i in range(64)]
    check(make_batch([1] * 64, lens, **LLAMA3_8B, block_size=16, dtype=dtype), num_kv_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_gpu_decode_long_context_auto_split(dtype: torch.dtype, block_size: int) -> None:
    batch = make_batch([1, 1], [4096, 1500], **LLAMA3_8B, block_size=block_size, dtype=dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert choose_kv_splits(2, 8, 1, 4097, sms) > 1
    check(batch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("context_len", [0, 1])
def test_gpu_prefill_4k(dtype: torch.dtype, head_dim: int, context_len: int) -> None:
    check(make_batch([4096], [context_len], 32, 8, head_dim, 16, dtype=dtype))


@pytest.mark.gpu
def test_gpu_launch_does_not_sync() -> None:
    """With the two hints given, neither path (one launch, split-KV) waits for the device."""
    mixed = make_batch([1] * 8 + [300], [900] * 8 + [100], **LLAMA3_8B, block_size=16, dtype=torch.bfloat16)
    decode = make_batch([1] * 2, [5000, 3000], **LLAMA3_8B, block_size=16, dtype=torch.bfloat16)
    calls: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (mixed, dict(max_query_len=300, max_seq_len=901)), (decode, dict(max_query_len=1, max_seq_len=5001)),
    ]
    for batch, hints in calls:  # compile first: loading a module is not what this checks
        paged_attention(**batch, **hints)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch, hints in calls:
            paged_attention(**batch, **hints)
    finally:
        torch.cuda.set_sync_debug_mode("default")
