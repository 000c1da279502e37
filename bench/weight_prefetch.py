"""Batch-1 decode with and without the L2 weight prefetch (engine.weight_prefetch), in one process.

    python bench/weight_prefetch.py [--shape gpt2-xl] [--mibs 0,16,24,32] [--rounds 2] [--json F]

Builds the random model of the shape on the GPU (as bench/engine.py does) and one engine with CUDA graphs for
batch 1. For each window (MiB; 0 = off), in alternating rounds, it plans the prefetch, captures the decode
graph again and times ms per output token: (generate of --new-tokens - generate of 1) / (new tokens - 1), a
--prompt-len prompt, medians of --repeats. The floor is bench/engine.py's (weight + KV bytes a step reads /
the copy bandwidth measured here). First, the mechanism alone: one GEMV over a 6400 x 1600 weight (GPT-2 XL's
fc, 20 MB) with L2 flushed, cold and right after a launch that only prefetched that weight.
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

from bench.engine import SHAPES, build_hf, copy_bandwidth, floor_bytes_per_step, prompts, timed_ms  # noqa: E402


def gemv_cold_vs_prefetched(weight: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """µs of one GEMV over ``weight`` after an L2 flush, with and without a prefetch-only launch before it."""
    from kernels.gemv import gemv
    from kernels.l2_prefetch import L2Prefetch

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device="cuda")
    tiny_w = torch.randn(512, 64, dtype=weight.dtype, device="cuda")
    tiny_x = torch.randn(1, 64, dtype=weight.dtype, device="cuda")
    hint = L2Prefetch((L2Prefetch.of(weight),))
    out: dict[str, float] = {}
    for mode in ("cold", "prefetched", "cold", "prefetched"):
        times = []
        for _ in range(repeats):
            flush.fill_(1)
            if mode == "prefetched":
                gemv(tiny_x, tiny_w, prefetch=hint)
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000)  # ~0.1 ms: the prefetches land
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            gemv(x, weight)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        out[mode] = statistics.median(times)
    out["weight_bytes"] = weight.numel() * weight.element_size()
    return out


def recapture(engine: Any, window_bytes: int) -> None:
    from engine.cuda_graphs import DecodeGraphs
    from engine.weight_prefetch import plan_weight_prefetch

    runner = engine.runner
    plan_weight_prefetch(runner.model, window_bytes)
    runner.graphs = None
    torch.cuda.empty_cache()
    runner.graphs = DecodeGraphs(runner.model, engine.config.max_num_seqs, runner.builder.max_blocks_per_seq,
                                 runner.max_seq_len, runner.device)
    runner.graphs.capture()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-xl", choices=list(SHAPES))
    ap.add_argument("--mibs", default="0,16,24,32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from engine.engine import init_inference
    from engine.request import SamplingParams

    bw = copy_bandwidth()
    hf = build_hf(args.shape)
    floor_ms = floor_bytes_per_step(hf, 1, args.prompt_len + args.new_tokens // 2) / bw * 1e3
    dtype = str(SHAPES[args.shape]["dtype"]).removeprefix("torch.")
    engine = init_inference(hf, {"dtype": dtype, "enable_cuda_graph": True, "cuda_graph_steps": "decode",
                                 "kv_cache_memory_fraction": 0.3, "max_num_seqs": 1, "weight_prefetch_mib": 0})
    prompt = prompts(1, args.prompt_len, hf.config.vocab_size)
    del hf
    torch.cuda.empty_cache()
    isolated = gemv_cold_vs_prefetched(torch.randn(6400, 1600, dtype=torch.float16, device="cuda"))
    print(f"{torch.cuda.get_device_name()}  {args.shape}  copy {bw / 1e9:.0f} GB/s  floor {floor_ms:.3f} ms/token")
    print(f"one GEMV over {isolated['weight_bytes'] / 2**20:.1f} MiB: cold {isolated['cold']:.1f} us, "
          f"after a prefetch {isolated['prefetched']:.1f} us", flush=True)

    def run(n: int) -> None:
        engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))

    mibs = [int(m) for m in args.mibs.split(",")]
    tpot: dict[int, list[float]] = {m: [] for m in mibs}
    for _ in range(args.rounds):
        for mib in mibs:
            recapture(engine, mib * 2**20)
            first, full = timed_ms(lambda: run(1), args.repeats), timed_ms(lambda: run(args.new_tokens), args.repeats)
            tpot[mib].append((full - first) / (args.new_tokens - 1))
            print(f"window {mib:>3} MiB: {tpot[mib][-1]:.3f} ms/token ({tpot[mib][-1] / floor_ms:.2f}x floor)",
                  flush=True)
    print("window MiB  ms/token (median)  x floor")
    for mib, values in tpot.items():
        print(f"{mib:>10}  {statistics.median(values):>17.3f}  {statistics.median(values) / floor_ms:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), shape=args.shape,
                                                   copy_bytes_per_s=bw, floor_ms_per_token=floor_ms,
                                                   isolated_gemv_us=isolated, tpot_ms=tpot), indent=1))


if __name__ == "__main__":
    main()
