"""The fused one-row entry of a block (norm -> projection -> activation or rotary + KV write, one launch)
against the same work as separate launches, with cold weights, over tile shapes.

    python bench/fused_gemv.py [--json out.json]

Separate = the norm kernel with its residual add, the GEMV (2 x 2048 tiles), then SiLU-and-mul / GELU /
rotary + KV write; fused = kernels.gemv.norm_gemv / norm_qkv_gemv at each (rows or pairs a program, K
slice, warps). Each measurement is a CUDA graph of back-to-back calls over enough weight copies to
overflow L2 (as in a decode step); percent = weight bytes / time / copy bandwidth of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from bench.skinny_linear import COLD_BYTES, per_call_us  # noqa: E402
from kernels import get_ops  # noqa: E402
from kernels.gemv import norm_gemv, norm_qkv_gemv  # noqa: E402

# name: (kind, hidden, rows or heads, norm); kind "qkv" -> rows = (Hq, Hkv, D)
CASES = {
    "8b qkv+rope": ("qkv", 4096, (32, 8, 128), "rms"),
    "8b gate_up+silu": ("silu_and_mul", 4096, 2 * 14336, "rms"),
    "1b qkv+rope": ("qkv", 2048, (32, 8, 64), "rms"),
    "1b gate_up+silu": ("silu_and_mul", 2048, 2 * 8192, "rms"),
    "gpt2 qkv+kv": ("qkv", 1600, (25, 25, 64), "layer"),
    "gpt2 fc+gelu": ("gelu_tanh", 1600, 6400, "layer"),
}
CONFIGS = [(1, 2048, 4), (2, 1024, 4), (4, 512, 4), (8, 256, 4), (4, 1024, 8), (8, 512, 8), (16, 256, 8)]


def case_times(kind: str, hidden: int, rows: Any, norm: str) -> tuple[float, list[float], int]:
    sep_ops = replace(get_ops("triton"), norm_qkv_one_row=None, norm_linear_one_row=None)  # no fused launch
    dt, dev = torch.bfloat16, "cuda"
    n_rows = (rows[0] + 2 * rows[1]) * rows[2] if kind == "qkv" else rows
    copies = max(2, -(-COLD_BYTES // (n_rows * hidden * 2)))
    ws = [torch.randn(n_rows, hidden, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
    x, res = (torch.randn(1, hidden, device=dev, dtype=dt) for _ in range(2))
    nw = torch.ones(hidden, device=dev, dtype=dt)
    nb = torch.zeros(hidden, device=dev, dtype=dt) if norm == "layer" else None
    bias = torch.zeros(n_rows, device=dev, dtype=dt) if norm == "layer" else None
    calls = max(copies, 8)
    if kind == "qkv":
        hq, hkv, d = rows
        cos_sin = torch.randn(4096, d, device=dev) if norm == "rms" else None
        kc, vc = (torch.zeros(64, 16, hkv, d, device=dev, dtype=dt) for _ in range(2))
        pos, slot = torch.tensor([700], device=dev), torch.tensor([123], device=dev)
        kv = ((hq, hkv, d), pos, cos_sin, kc, vc, slot)
        base = per_call_us(lambda i: sep_ops.norm_qkv_kv_write(x, res, nw, nb, 1e-5, ws[i % copies], bias, *kv), calls)
        fused = [per_call_us(lambda i, c=c: norm_qkv_gemv(x, res, nw, nb, 1e-5, ws[i % copies], bias, *kv,
                                                         block_n=c[0], block_k=c[1], num_warps=c[2]), calls)
                 for c in CONFIGS]
    else:
        base = per_call_us(lambda i: sep_ops.norm_linear(x, res, nw, nb, 1e-5, ws[i % copies], bias, kind), calls)
        fused = [per_call_us(lambda i, c=c: norm_gemv(x, res, nw, nb, 1e-5, ws[i % copies], bias, kind,
                                                     block_n=c[0], block_k=c[1], num_warps=c[2]), calls)
                 for c in CONFIGS]
    return base, fused, n_rows * hidden * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = torch.empty(COLD_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * COLD_BYTES / (per_call_us(lambda i: dst.copy_(src), 4) * 1e-6)
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e9:.0f} GB/s  bf16, one row, weights cold in L2")
    names = ["separate"] + [f"{n}x{k}/{w}w" for n, k, w in CONFIGS]
    print(f"{'case':>16} {'floor us':>9} " + " ".join(f"{n:>13}" for n in names))
    out = []
    for name, case in CASES.items():
        base, fused, nbytes = case_times(*case)
        floor = nbytes / bw * 1e6
        print(f"{name:>16} {floor:9.1f} " + " ".join(f"{t:6.1f} ({floor / t:3.0%})" for t in [base, *fused]),
              flush=True)
        out.append(dict(case=name, floor_us=floor, us=dict(zip(names, [base, *fused], strict=True))))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bytes_per_s=bw, rows=out), indent=2))


if __name__ == "__main__":
    main()
