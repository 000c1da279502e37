"""Programmatic dependent launch (PDL) of the injected kernels.

A PDL kernel may start while the kernel before it still runs, so before its ``griddepcontrol.wait`` it must
store nothing and read nothing a kernel writes; only the GEMV's weights and the norms' gains may be loaded
there. The CPU checks the launch plumbing (on the interpreter ``pdl`` changes nothing) and the compiled sm_90
code; a GPU checks that a chain of PDL kernels in a CUDA graph gives the serial results bit for bit.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from kernels import get_ops, triton_ops_available
from kernels.rms_norm import pdl_meta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_pdl_meta_is_on_only_for_cuda() -> None:
    assert pdl_meta(True, torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert pdl_meta(False, torch.device("cuda", 0)) == {"PDL": False}
    assert pdl_meta(True, torch.device("cpu")) == {"PDL": False}


def test_get_ops_binds_pdl_to_every_triton_kernel() -> None:
    ops, plain = get_ops("triton", pdl=True), get_ops("triton")
    for name in triton_ops_available():
        op = getattr(ops, name)
        assert isinstance(op, partial) and op.keywords == {"pdl": True}, name
        assert getattr(plain, name) is op.func, name
    assert get_ops("triton", pdl=True).linear.func.__module__ == "kernels.gemv"
    with pytest.raises(ValueError, match="pdl applies to the 'triton' backend"):
        get_ops("torch", pdl=True)


def test_every_triton_launcher_takes_pdl_as_a_keyword() -> None:
    from kernels.paged_attention_triton import paged_attention

    launchers = [f for name, f in vars(get_ops("triton")).items() if name != "paged_attention"] + [paged_attention]
    for fn in launchers:
        param = inspect.signature(fn).parameters.get("pdl")
        assert param is not None and param.kind is param.KEYWORD_ONLY and param.default is False, fn


def _decode_inputs(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One decode token of a small GQA layer: 4 q heads, 2 kv heads of 16, a 20-token context in 8-slot blocks."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    k_cache, v_cache = r(4, 8, 2, 16), r(4, 8, 2, 16)
    ints = lambda *v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return dict(h=r(1, 64), res=r(1, 64), gain=r(64), bias=r(64), w_qkv=r(128, 64), b_qkv=r(128), w_o=r(64, 64),
                w_up=r(96, 64), w_down=r(64, 48),
                cos_sin=r(64, 16).float(), pos=ints(19).long(), slot=ints(19).long(), k_cache=k_cache,
                v_cache=v_cache, tables=ints(2, 0, 3)[None], qsl=ints(0, 1), seq_lens=ints(20))


def _decode_chain(ops: Any, d: dict[str, Any], layers: int) -> list[torch.Tensor]:
    """Every injected op, each reading the one before it, ``layers`` times: one-row decode of a toy block."""
    h, res, outs = d["h"], d["res"].clone(), []
    k_cache, v_cache = d["k_cache"].clone(), d["v_cache"].clone()
    for _ in range(layers):
        x, res = ops.rms_norm(h, d["gain"], 1e-5, res)
        q = ops.qkv_kv_write(x, d["w_qkv"], None, 4, 2, k_cache, v_cache, d["slot"], d["pos"], d["cos_sin"])
        ops.qkv_kv_write(x, d["w_qkv"], d["b_qkv"], 4, 2, k_cache, v_cache, d["slot"] - 1)  # GPT-2's: no rotary
        a = ops.paged_attention(q, k_cache, v_cache, d["tables"], d["qsl"], d["seq_lens"], 0.25,
                                max_query_len=1, max_seq_len=20).flatten(1)
        x, res = ops.layer_norm(ops.linear(a, d["w_o"], d["bias"]), d["gain"], d["bias"], 1e-5, res)
        up = ops.linear_act(x, d["w_up"], None, "silu_and_mul")
        h = ops.linear_act(up, d["w_down"], d["bias"], "gelu_tanh")
        outs += [h, res]
    return [*outs, k_cache, v_cache]


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA: test_gpu_pdl_chain_in_a_cuda_graph_matches_serial")
def test_pdl_changes_nothing_off_a_gpu() -> None:
    d = _decode_inputs()
    for got, want in zip(_decode_chain(get_ops("triton", pdl=True), d, 1), _decode_chain(get_ops("triton"), d, 1),
                         strict=True):
        assert torch.equal(got, want)


# --- the compiled code -----------------------------------------------------------------------------------

ARG_TYPES = {"slot_ptr": "*i64", "pos_ptr": "*i64", "cs_ptr": "*fp32", "eps": "fp32"}

# kernel (module, name) -> the constexprs of a decode launch at Llama-3-8B-like widths
KERNELS: dict[tuple[str, str], dict[str, Any]] = {
    ("kernels.gemv", "_gemv_kernel"): dict(HAS_BIAS=True, ACT=1, BLOCK_N=2, BLOCK_K=2048),
    ("kernels.gemv", "_gemv_silu_mul_kernel"): dict(HAS_BIAS=True, BLOCK_P=1, BLOCK_K=2048),
    ("kernels.qkv_projection", "_qkv_gemv_kernel"): dict(N_Q_HEADS=32, N_KV_HEADS=8, HALF=64, HAS_BIAS=True,
                                                        ROTARY=True, BLOCK_P=1, BLOCK_K=2048),
    ("kernels.rms_norm", "_rms_norm_kernel"): dict(HAS_RESIDUAL=True, BLOCK_M=1, BLOCK_N=4096),
    ("kernels.layer_norm", "_layer_norm_kernel"): dict(HAS_RESIDUAL=True, BLOCK_M=1, BLOCK_N=2048),
    ("kernels.activation", "_silu_and_mul_kernel"): dict(BLOCK_M=1, BLOCK_N=2048),
    ("kernels.activation", "_gelu_kernel"): dict(TANH=True, BLOCK=2048),
    ("kernels.kv_write", "_kv_write_kernel"): dict(N_HEADS=8, HEAD_DIM=128, BLOCK_T=2, BLOCK_H=8, BLOCK_D=128),
    ("kernels.rotary", "_rotary_kernel"): dict(N_Q_HEADS=32, N_K_HEADS=8, HALF=64, N_PASS=0, BLOCK_T=1, BLOCK_HQ=32,
                                               BLOCK_HK=8, BLOCK_HALF=64, BLOCK_PASS=1),
    ("kernels.rotary", "_rotary_kv_write_kernel"): dict(N_Q_HEADS=32, N_K_HEADS=8, HALF=64, N_PASS=0, BLOCK_T=1,
                                                        BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64, BLOCK_PASS=1,
                                                        BLOCK_D=128),
}
LOADS_BEFORE_WAIT = {"_gemv_kernel", "_gemv_silu_mul_kernel", "_qkv_gemv_kernel",  # weights / gains only
                     "_rms_norm_kernel", "_layer_norm_kernel"}


def check_pdl_ptx() -> None:
    """Compile each jit_at_launch kernel for sm_90 with and without PDL and check where the wait sits. Needs
    TRITON_INTERPRET unset: test_pdl_kernels_compile_for_h100 runs it in a child."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for (module_name, kernel_name), constexprs in KERNELS.items():
        module = importlib.import_module(module_name)
        getattr(module, kernel_name)[(1,)]  # jit_at_launch: becomes triton.jit here, without a launch
        kernel = getattr(module, kernel_name)
        for pdl in (False, True):
            signature = {n: ARG_TYPES.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in kernel.arg_names}
            signature.update({n: "constexpr" for n in [*constexprs, "PDL"]})
            source = ASTSource(kernel, signature, {**constexprs, "PDL": pdl}, {})
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
            assert ("griddepcontrol.wait" in ptx) == pdl, kernel_name
            assert ("griddepcontrol.launch_dependents" in ptx) == pdl, kernel_name
            if pdl:
                wait = ptx.index("griddepcontrol.wait")
                assert wait < ptx.index("griddepcontrol.launch_dependents"), kernel_name
                before = ptx[:wait]
                assert "st.global" not in before and "atom." not in before, kernel_name
                assert ("ld.global" in before) == (kernel_name in LOADS_BEFORE_WAIT), kernel_name


def _triton_has_cuda_backend() -> bool:
    return "nvidia" in importlib.import_module("triton.backends").backends


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the GPU tests launch the kernels")
@pytest.mark.skipif(not _triton_has_cuda_backend(), reason="this triton build has no CUDA backend to compile with")
def test_pdl_kernels_compile_for_h100() -> None:
    """The waits in the real sm_90 code: nothing stored before them, and only the GEMV's weights and the norms'
    gains loaded there; without PDL no grid-dependency instruction at all."""
    root = Path(__file__).resolve().parents[2]
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {str(Path(__file__).parent)!r}]; "
            "import test_pdl as t; t.check_pdl_ptx()")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


# --- GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)),
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0+")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_pdl_chain_in_a_cuda_graph_matches_serial(dtype: torch.dtype) -> None:
    """Forty layers of dependent PDL launches, captured and replayed, give the serial launches' bits."""
    d = _decode_inputs(dtype)
    want = _decode_chain(get_ops("triton"), d, 40)
    pdl_ops = get_ops("triton", pdl=True)
    assert all(torch.equal(g, w) for g, w in zip(_decode_chain(pdl_ops, d, 40), want, strict=True))  # eager
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _decode_chain(pdl_ops, d, 40)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
