"""Skinny linears (decode: few rows) through the ways torch can reach cuBLAS, against the bandwidth floor.

    python bench/skinny_linear.py [--rows 1,32,64,256]

Shapes are the Llama-3.1-8B / 3.2-1B projections (out x in). Each is timed as F.linear(x, W) (what the
models call), as (W @ x^T)^T (cuBLAS sees one column instead of one row and may pick another kernel), and
with cuBLAS preferred over cuBLASLt. Percent = weight bytes / time / copy bandwidth of this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {"8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (28672, 4096), "8b down": (4096, 14336),
          "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192)}


def us(fn: object, repeats: int = 200) -> float:
    graph = torch.cuda.CUDAGraph()  # replayed back to back: no launch gaps, as in a decode graph
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()  # type: ignore[operator]
    times = []
    for _ in range(repeats // 20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,32")
    args = ap.parse_args()
    buf = torch.empty(2, 1 << 30, dtype=torch.uint8, device="cuda")
    bw = 2 * buf[0].numel() / (us(lambda: buf[1].copy_(buf[0]), 40) * 1e-6)
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e9:.0f} GB/s  bf16")
    print(f"{'shape':>12} {'rows':>5} {'floor us':>9} {'F.linear':>14} {'(W@xT)T':>14} {'cublas pref':>14}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            floor = w.numel() * 2 / bw * 1e6
            a = us(lambda x=x, w=w: F.linear(x, w))
            b = us(lambda x=x, w=w: (w @ x.t()).t())
            torch.backends.cuda.preferred_blas_library("cublas")
            c = us(lambda x=x, w=w: F.linear(x, w))
            torch.backends.cuda.preferred_blas_library("default")
            cells = " ".join(f"{t:7.1f} ({floor / t:4.0%})" for t in (a, b, c))
            print(f"{name:>12} {m:5d} {floor:9.1f} {cells}", flush=True)


if __name__ == "__main__":
    main()
