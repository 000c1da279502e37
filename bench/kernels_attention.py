"""Paged attention kernel on one GPU: decode against copy bandwidth, prefill against SDPA's flash backend.

    python bench/kernels_attention.py [--sweep] [--json out.json]

Cases (Llama-3-8B attention: 32 query heads, 8 kv heads, head dim 128, bf16, block size 16, shuffled
block tables):
  decode-b64-4k    64 sequences x 4096 cached tokens, one new token each (one launch)
  decode-b1-32k    1 sequence x 32768 tokens: split-KV (the launcher's choice), and unsplit for contrast
  mixed-b63-4k+512 63 decode tokens at 4k context plus one 512-token prompt chunk (SplitFuse step)
  prefill-4k       one 4096-token causal prompt, compared with torch SDPA (flash backend) on the same
                   non-paged shapes
Decode reports bytes/s over the bytes that must move (K and V of every cached token, q, out) and that
as a share of the device-to-device copy bandwidth measured in the same run (dst.copy_(src), read +
write). Prefill reports FLOP/s (4 * Hq * D * T^2 / 2 for causal attention) and SDPA time / our time.
Times are medians of triton.testing.do_bench (which flushes L2 between runs). ``--sweep`` also times a
small grid of tile configurations and split counts and prints the best, to retune ``tile_config``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.paged_attention import paged_attention_ref  # noqa: E402
from kernels.paged_attention_triton import TileConfig, paged_attention, tile_config  # noqa: E402

HQ, HKV, D, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_SWEEP = [TileConfig(16, n, w, s) for n, w, s in [
    (16, 4, 4), (32, 2, 3), (32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2),
]]
PREFILL_SWEEP = [TileConfig(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3),
]]
SPLIT_SWEEP = [4, 8, 16, 32, 64, 128]


def bench_ms(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3)


def paged_batch(q_lens: list[int], seq_lens: list[int], seed: int = 0) -> dict[str, Any]:
    """Random K/V in a pool with shuffled block tables; sequence b has q_lens[b] new tokens of seq_lens[b]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = [triton.cdiv(s, BLOCK_SIZE) for s in seq_lens]
    pool = sum(num_blocks)
    ids = torch.randperm(pool, device="cuda", generator=g).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(num_blocks), dtype=torch.int32, device="cuda")
    offsets = [0]
    for b, n in enumerate(num_blocks):
        tables[b, :n] = ids[offsets[-1] : offsets[-1] + n]
        offsets.append(offsets[-1] + n)
    shape = (pool, BLOCK_SIZE, HKV, D)
    return dict(
        q=torch.randn(sum(q_lens), HQ, D, device="cuda", dtype=DTYPE, generator=g),
        k_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=g),
        v_cache=torch.randn(shape, device="cuda", dtype=DTYPE, generator=g),
        block_tables=tables,
        query_start_loc=torch.tensor([0, *q_lens], device="cuda").cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        scale=D**-0.5,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )


def moved_bytes(batch: dict[str, Any]) -> int:
    elem = batch["q"].element_size()
    kv = int(batch["seq_lens"].sum()) * HKV * D * 2 * elem
    return kv + 2 * batch["q"].numel() * elem


def max_error(batch: dict[str, Any], **kwargs: Any) -> float:
    return float((paged_attention(**batch, **kwargs).float() - paged_attention_ref(**batch).float()).abs().max())


def decode_case(name: str, q_lens: list[int], seq_lens: list[int], copy_bw: float, **kwargs: Any) -> dict[str, Any]:
    batch = paged_batch(q_lens, seq_lens)
    ms = bench_ms(lambda: paged_attention(**batch, **kwargs))
    bw = moved_bytes(batch) / (ms * 1e-3)
    ref_ms = bench_ms(lambda: paged_attention_ref(**batch))
    return dict(case=name, ms=ms, bytes_per_s=bw, pct_of_copy=100 * bw / copy_bw, ref_ms=ref_ms,
                max_abs_err=max_error(batch, **kwargs), **{k: str(v) for k, v in kwargs.items()})


def sdpa_flash_ms(tokens: int) -> tuple[float, str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, HQ, tokens, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(1, HKV, tokens, D, device="cuda", dtype=DTYPE) for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            fn()
            return bench_ms(fn), "enable_gqa"
        except RuntimeError:
            kr, vr = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731
            return bench_ms(fn), "repeated kv"


def prefill_case(tokens: int = 4096) -> dict[str, Any]:
    batch = paged_batch([tokens], [tokens])
    ms = bench_ms(lambda: paged_attention(**batch))
    flops = 4 * HQ * D * tokens * tokens / 2
    sdpa_ms, gqa = sdpa_flash_ms(tokens)
    return dict(case=f"prefill-{tokens // 1024}k", ms=ms, flop_per_s=flops / (ms * 1e-3), sdpa_flash_ms=sdpa_ms,
                sdpa_gqa=gqa, speed_vs_sdpa=sdpa_ms / ms, ref_ms=bench_ms(lambda: paged_attention_ref(**batch)),
                max_abs_err=max_error(batch))


def sweep_row(case: str, label: str, batch: dict[str, Any], copy_bw: float, **kwargs: Any) -> dict[str, Any]:
    """One timed variant; a config that does not compile or fit (shared memory) is reported, not fatal."""
    try:
        ms = bench_ms(lambda: paged_attention(**batch, **kwargs))
    except Exception as exc:  # noqa: BLE001 - e.g. triton OutOfResources
        return dict(case=case, config=label, ms=None, error=f"{type(exc).__name__}: {exc}"[:200])
    if batch["max_query_len"] == 1:
        return dict(case=case, config=label, ms=ms, pct_of_copy=100 * moved_bytes(batch) / (ms * 1e-3) / copy_bw)
    tokens = batch["q"].shape[0]
    return dict(case=case, config=label, ms=ms, tflop_per_s=4 * HQ * D * tokens**2 / 2 / ms / 1e9)


def sweep(copy_bw: float) -> list[dict[str, Any]]:
    decode, long, prefill = paged_batch([1] * 64, [4096] * 64), paged_batch([1], [32768]), paged_batch([4096], [4096])
    return (
        [sweep_row("decode-b64-4k", str(cfg), decode, copy_bw, config=cfg) for cfg in DECODE_SWEEP]
        + [sweep_row("decode-b1-32k", f"splits={s}", long, copy_bw, num_kv_splits=s) for s in SPLIT_SWEEP]
        + [sweep_row("prefill-4k", str(cfg), prefill, copy_bw, config=cfg) for cfg in PREFILL_SWEEP]
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    copy_bw = copy_bandwidth()
    cases = [
        decode_case("decode-b64-4k", [1] * 64, [4096] * 64, copy_bw),
        decode_case("decode-b1-32k", [1], [32768], copy_bw),
        decode_case("decode-b1-32k-unsplit", [1], [32768], copy_bw, num_kv_splits=1),
        decode_case("mixed-b63-4k+512", [1] * 63 + [512], [4096] * 63 + [512], copy_bw),
        prefill_case(),
    ]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  copy_bytes_per_s=copy_bw, default_configs=dict(
                      decode=str(tile_config(HQ // HKV, D, 1)), prefill=str(tile_config(HQ // HKV, D, 4096))),
                  cases=cases)
    if args.sweep:
        result["sweep"] = sweep(copy_bw)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy {result['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    print(f"{'case':24} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'x SDPA':>7} {'ref ms':>8} {'err':>8}")
    for c in result["cases"]:
        gbs = f"{c['bytes_per_s'] / 1e9:.0f}" if "bytes_per_s" in c else ""
        pct = f"{c['pct_of_copy']:.0f}" if "pct_of_copy" in c else ""
        tflops = f"{c['flop_per_s'] / 1e12:.0f}" if "flop_per_s" in c else ""
        vs = f"{c['speed_vs_sdpa']:.2f}" if "speed_vs_sdpa" in c else ""
        print(f"{c['case']:24} {c['ms']:8.3f} {gbs:>7} {pct:>6} {tflops:>8} {vs:>7} {c['ref_ms']:8.2f} "
              f"{c['max_abs_err']:8.1e}")
    for row in result.get("sweep", []):
        if "error" in row:
            extra = row["error"]
        elif "pct_of_copy" in row:
            extra = f"{row['pct_of_copy']:.0f}% copy"
        else:
            extra = f"{row['tflop_per_s']:.0f} TFLOP/s"
        ms = "" if row["ms"] is None else f"{row['ms']:8.3f} ms"
        print(f"sweep {row['case']:16} {row['config']:60} {ms:>11}  {extra}")
    if "sweep" in result:
        for case in ("decode-b64-4k", "decode-b1-32k", "prefill-4k"):
            best = min((r for r in result["sweep"] if r["case"] == case and r["ms"] is not None), key=lambda r: r["ms"])
            print(f"best {case}: {best['config']} {best['ms']:.3f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile configs and split counts")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_attention.py needs a CUDA GPU")
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
