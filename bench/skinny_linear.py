"""One-row linears (decode at batch 1): cuBLAS (F.linear) against the Triton GEMV, with cold weights.

    python bench/skinny_linear.py [--json out.json]

For each projection of the Llama-3.1-8B, Llama-3.2-1B and GPT-2 XL shapes, a CUDA graph runs the product
over enough copies of the weight to overflow L2 (each call reads its weight from HBM, as in a decode step),
back to back. Percent = weight bytes / time / copy bandwidth measured the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.gemv import gemv  # noqa: E402

SHAPES = {
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
    "8b lm_head": (128256, 4096),
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
    "gpt2 qkv": (4800, 1600), "gpt2 o": (1600, 1600), "gpt2 fc": (6400, 1600), "gpt2 proj": (1600, 6400),
    "gpt2 lm_head": (50257, 1600),
}
GEMV_CONFIGS = [(8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 8), (2, 2048, 4)]  # block_n, block_k, warps
COLD_BYTES = 256 << 20


def per_call_us(fn: Any, calls: int) -> float:
    fn(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def shape_times(n_out: int, n_in: int) -> list[float]:
    """Per-call us of cuBLAS, then of each GEMV config, reading a different weight copy each call."""
    copies = max(2, -(-COLD_BYTES // (n_out * n_in * 2)))
    ws = [torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
    calls = max(copies, 8)
    times = [per_call_us(lambda i: F.linear(x, ws[i % copies]), calls)]
    for bn, bk, nw in GEMV_CONFIGS:
        times.append(per_call_us(
            lambda i, bn=bn, bk=bk, nw=nw: gemv(x, ws[i % copies], block_n=bn, block_k=bk, num_warps=nw), calls))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    args = ap.parse_args()
    src = torch.empty(COLD_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * COLD_BYTES / (per_call_us(lambda i: dst.copy_(src), 4) * 1e-6)
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e9:.0f} GB/s  bf16, one row, weights cold in L2")
    names = ["cuBLAS"] + [f"gemv {n}x{k}/{w}w" for n, k, w in GEMV_CONFIGS]
    print(f"{'shape':>13} {'floor us':>9} " + " ".join(f"{n:>15}" for n in names))
    rows = []
    for name, (n_out, n_in) in SHAPES.items():
        times = shape_times(n_out, n_in)
        floor = n_out * n_in * 2 / bw * 1e6
        print(f"{name:>13} {floor:9.1f} " + " ".join(f"{t:7.1f} ({floor / t:4.0%})" for t in times), flush=True)
        rows.append(dict(shape=name, out=n_out, inp=n_in, floor_us=floor, us=dict(zip(names, times, strict=True))))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bytes_per_s=bw, rows=rows), indent=2))


if __name__ == "__main__":
    main()
