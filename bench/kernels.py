"""Fused Triton kernels on one GPU against copy bandwidth and their torch references, at Llama-3-8B shapes.

    python bench/kernels.py [--tokens 8192] [--json out.json] [--commit SHA] [--no-attention] [--sweep]

Measured in the same run: the device-to-device copy bandwidth (dst.copy_(src) of 1 GiB, bytes read +
written per second) and the bf16 matmul rate (torch.matmul 8192^3, cuBLAS). Then every kernel at
``--tokens`` tokens of Llama-3-8B (hidden 4096, intermediate 14336, 32 q / 8 kv heads of 128, block 16;
GELU at 4 x 4096, GPT-2 style) in bf16: its time, the bytes it must move per second, that as a share
of copy bandwidth (target >= 75% for norm, rotary and activation kernels), the torch reference's time,
and the largest difference from the reference. Linear layers stay on cuBLAS through torch (one row).
The paged-attention rows come from bench/kernels_attention.py when that module is present.
Times are medians of triton.testing.do_bench (L2 flushed between runs). ``--sweep`` also times each
kernel at other tile sizes (the module constants its launcher reads), to retune them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ on sys.path (where this file would shadow the kernels package).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.activation import gelu, gelu_ref, silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.kv_write import kv_write, kv_write_ref  # noqa: E402
from kernels.layer_norm import layer_norm, layer_norm_ref  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from kernels.rotary import rotary, rotary_kv_write, rotary_kv_write_ref, rotary_ref  # noqa: E402

HIDDEN, INTER, HQ, HKV, D, BLOCK_SIZE, DTYPE = 4096, 14336, 32, 8, 128, 16, torch.bfloat16
DEVICE = "cuda"
TARGET_PCT = 75.0
SWEEPS = {  # module constant -> (values to try, the cases whose launchers read it)
    "kernels.rms_norm.ROW_TILE": ((4096, 8192, 16384), ("rms_norm", "rms_norm + residual", "layer_norm + residual")),
    "kernels.rotary.TILE": ((1024, 2048, 4096, 8192), ("rotary", "rotary + kv_write (fused)")),
    "kernels.kv_write.TILE": ((1024, 2048, 4096, 8192), ("kv_write",)),
    "kernels.activation.TILE": ((1024, 2048, 4096, 8192), ("silu_and_mul", "gelu tanh", "gelu erf")),
}
Outputs = Callable[[], Any]


@dataclass
class Case:
    name: str
    kernel: Outputs  # each returns the tensors to compare; both may update their own copies in place
    reference: Outputs
    nbytes: int  # bytes the op must read and write at least
    target: bool  # held to TARGET_PCT of copy bandwidth


def bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return 2 * n**3 / (bench_ms(lambda: torch.matmul(a, b)) * 1e-3)


def randn(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def norm_cases(t: int) -> list[Case]:
    x, res, w, b = randn(t, HIDDEN), randn(t, HIDDEN), 1 + 0.1 * randn(HIDDEN), randn(HIDDEN)
    res_k, res_r, res_lk, res_lr = (res.clone() for _ in range(4))
    e = x.element_size()
    return [
        Case("rms_norm", lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5), 2 * t * HIDDEN * e, True),
        Case("rms_norm + residual", lambda: rms_norm(x, w, 1e-5, res_k), lambda: rms_norm_ref(x, w, 1e-5, res_r),
             4 * t * HIDDEN * e, True),
        Case("layer_norm + residual", lambda: layer_norm(x, w, b, 1e-5, res_lk),
             lambda: layer_norm_ref(x, w, b, 1e-5, res_lr), 4 * t * HIDDEN * e, True),
    ]


def attention_input_cases(t: int) -> list[Case]:
    fused = randn(t, (HQ + 2 * HKV) * D)
    q, k, v = (p.view(t, -1, D) for p in fused.split([HQ * D, HKV * D, HKV * D], dim=-1))
    positions = torch.randint(0, 8192, (t,), device=DEVICE)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEVICE).float() / D)
    freqs = torch.outer(torch.arange(8192, device=DEVICE).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    num_blocks = t // BLOCK_SIZE + 64
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:t]
    caches = [torch.zeros(num_blocks, BLOCK_SIZE, HKV, D, device=DEVICE, dtype=DTYPE) for _ in range(8)]
    e, qkv_bytes = q.element_size(), t * (HQ + 2 * HKV) * D * q.element_size()
    cs_bytes, slot_bytes = t * D * 4, t * 8

    def kv(fn: Callable, kc: torch.Tensor, vc: torch.Tensor) -> Outputs:
        def call() -> tuple[torch.Tensor, torch.Tensor]:
            fn(k, v, kc, vc, slots)
            return kc, vc

        return call

    def fused_op(fn: Callable, kc: torch.Tensor, vc: torch.Tensor) -> Outputs:
        return lambda: (fn(positions, q, k, v, cos_sin, kc, vc, slots), kc, vc)

    return [
        Case("rotary", lambda: rotary(positions, q, k, cos_sin), lambda: rotary_ref(positions, q, k, cos_sin),
             2 * t * (HQ + HKV) * D * e + cs_bytes, True),
        Case("kv_write", kv(kv_write, *caches[0:2]), kv(kv_write_ref, *caches[2:4]),
             4 * t * HKV * D * e + slot_bytes, False),
        Case("rotary + kv_write (fused)", fused_op(rotary_kv_write, *caches[4:6]),
             fused_op(rotary_kv_write_ref, *caches[6:8]), 2 * qkv_bytes + cs_bytes + slot_bytes, True),
    ]


def activation_cases(t: int) -> list[Case]:
    gate_up, h = randn(t, 2 * INTER), randn(t, 4 * HIDDEN)
    e = gate_up.element_size()
    return [
        Case("silu_and_mul", lambda: silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up), 3 * t * INTER * e, True),
        Case("gelu tanh", lambda: gelu(h, "tanh"), lambda: gelu_ref(h, "tanh"), 2 * h.numel() * e, True),
        Case("gelu erf", lambda: gelu(h, "none"), lambda: gelu_ref(h, "none"), 2 * h.numel() * e, True),
    ]


def max_error(a: Any, b: Any) -> float:
    a, b = (x if isinstance(x, tuple | list) else (x,) for x in (a, b))
    return max(float((p.float() - q.float()).abs().max()) for p, q in zip(a, b, strict=True))


def measure(case: Case, copy_bw: float) -> dict[str, Any]:
    err = max_error(case.kernel(), case.reference())  # first calls: the in-place states still agree
    ms, ref_ms = bench_ms(case.kernel), bench_ms(case.reference)
    bw = case.nbytes / (ms * 1e-3)
    return dict(op=case.name, ms=ms, bytes_per_s=bw, pct_of_copy=100 * bw / copy_bw, ref_ms=ref_ms,
                speedup_vs_ref=ref_ms / ms, max_abs_err=err, target=case.target)


def sweep(cases: list[Case], copy_bw: float) -> list[dict[str, Any]]:
    rows = []
    for target, (values, names) in SWEEPS.items():
        module_name, attr = target.rsplit(".", 1)
        module = importlib.import_module(module_name)
        default = getattr(module, attr)
        try:
            for value in values:
                setattr(module, attr, value)
                for case in (c for c in cases if c.name in names):
                    ms = bench_ms(case.kernel)
                    rows.append(dict(op=case.name, knob=f"{attr}={value}", default=value == default, ms=ms,
                                     pct_of_copy=100 * case.nbytes / (ms * 1e-3) / copy_bw))
        finally:
            setattr(module, attr, default)
    return rows


def linear_row(t: int, matmul_flops: float) -> dict[str, Any]:
    """Llama's fused gate_up projection: cuBLAS through torch, no Triton."""
    x, w = randn(t, HIDDEN), randn(2 * INTER, HIDDEN)
    ms = bench_ms(lambda: F.linear(x, w))
    flops = 2 * t * HIDDEN * 2 * INTER / (ms * 1e-3)
    return dict(op="linear gate_up (cuBLAS)", ms=ms, flop_per_s=flops, pct_of_matmul=100 * flops / matmul_flops)


def attention_rows(copy_bw: float) -> tuple[list[dict[str, Any]], str]:
    try:
        from bench.kernels_attention import run as run_attention
    except ImportError as exc:
        return [], f"attention rows missing: bench/kernels_attention.py not importable ({exc})"
    try:
        result = run_attention(argparse.Namespace(sweep=False))
    except Exception as exc:  # noqa: BLE001 - its failure must not cost the rows above
        return [], f"attention rows failed: {type(exc).__name__}: {exc}"[:300]
    rows = []
    for c in result.get("cases", []):
        row = dict(op=f"attn {c['case']}", ms=c["ms"], ref_ms=c.get("ref_ms"), max_abs_err=c.get("max_abs_err"))
        if "bytes_per_s" in c:
            row.update(bytes_per_s=c["bytes_per_s"], pct_of_copy=100 * c["bytes_per_s"] / copy_bw)
        if "flop_per_s" in c:
            row["flop_per_s"] = c["flop_per_s"]
        rows.append(row)
    return rows, f"attention rows from bench/kernels_attention.py (its copy bandwidth: " \
                 f"{result.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s; % above uses this run's)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import triton

    copy_bw, matmul_flops = copy_bandwidth(), matmul_rate()
    cases = norm_cases(args.tokens) + attention_input_cases(args.tokens) + activation_cases(args.tokens)
    rows = [measure(c, copy_bw) for c in cases] + [linear_row(args.tokens, matmul_flops)]
    swept = sweep(cases, copy_bw) if args.sweep else []
    attn, attn_note = attention_rows(copy_bw) if args.attention else ([], "attention rows skipped (--no-attention)")
    return dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(),
                commit=args.commit or git_commit(), torch=torch.__version__, triton=triton.__version__,
                tokens=args.tokens, dtype=str(DTYPE), copy_bytes_per_s=copy_bw, matmul_flop_per_s=matmul_flops,
                rows=rows + attn, attention_note=attn_note, sweep=swept)


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value / scale, spec)


def print_table(r: dict[str, Any]) -> None:
    print(f"splitserve kernels  {r['date']}  {r['gpu']}  commit {r['commit']}  "
          f"torch {r['torch']}  triton {r['triton']}")
    print(f"copy {r['copy_bytes_per_s'] / 1e9:.0f} GB/s (device-to-device, read + write)   "
          f"bf16 matmul 8192^3 {r['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s (cuBLAS via torch)")
    print(f"Llama-3-8B shapes, {r['tokens']} tokens, {r['dtype']}; linear layers stay on cuBLAS through torch")
    print(f"{'op':28} {'ms':>8} {'GB/s':>6} {'%copy':>6} {'TFLOP/s':>8} {'ref ms':>8} {'x ref':>6} {'err':>8}")
    for row in r["rows"]:
        pct = fmt(row.get("pct_of_copy"), ".0f")
        if row.get("target") and row["pct_of_copy"] < TARGET_PCT:
            pct += "!"
        ref_ms = row.get("ref_ms")
        speed = f"{ref_ms / row['ms']:.1f}" if ref_ms else ""
        print(f"{row['op']:28} {row['ms']:8.3f} {fmt(row.get('bytes_per_s'), '.0f', 1e9):>6} {pct:>6} "
              f"{fmt(row.get('flop_per_s'), '.0f', 1e12):>8} {fmt(ref_ms, '.3f'):>8} {speed:>6} "
              f"{fmt(row.get('max_abs_err'), '.1e'):>8}")
    missed = [row["op"] for row in r["rows"] if row.get("target") and row["pct_of_copy"] < TARGET_PCT]
    print(f"target >= {TARGET_PCT:.0f}% of copy (norm, rotary, activation): "
          + ("met" if not missed else "missed by " + ", ".join(missed) + " (marked !)"))
    print(r["attention_note"])
    for row in r["sweep"]:
        mark = "  (default)" if row["default"] else ""
        print(f"sweep {row['op']:28} {row['knob']:16} {row['ms']:8.3f} ms {row['pct_of_copy']:5.0f}% copy{mark}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--commit", help="commit to print (default: git rev-parse --short HEAD, or 'unknown')")
    p.add_argument("--no-attention", dest="attention", action="store_false", help="skip bench/kernels_attention.py")
    p.add_argument("--sweep", action="store_true", help="also time other tile sizes of every kernel")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
