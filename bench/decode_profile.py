"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of a real-shaped model.

    python bench/decode_profile.py --shape llama-3.1-8b [--batch 1] [--context 576] [--prefill]

--prefill profiles the prompt's step instead (the TTFT step: --batch prompts of --context tokens) and
prints its wall time next to its kernel time: a wall time well above it means the CPU launches too slowly.

Prints the kernels by total CUDA time per step, and the step's sum against the bandwidth floor (the
bytes the step must read over the copy bandwidth measured in the same run). Eager steps run the same
kernels a CUDA graph replays; the gaps between them (launch overhead) are what graphs remove.

With programmatic dependent launch kernels overlap (each starts while the one before it finishes), so a
kernel's own duration overstates its cost. The critical-path table charges each kernel only for how far it
moved the step's finish line (its end minus the latest end before it); those charges sum to the step's span.
It also lists the kernels of one middle layer in order.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.engine import SHAPES, build_hf, copy_bandwidth, floor_bytes_per_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=576)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="decode through CUDA graphs")
    ap.add_argument("--no-pdl", action="store_true", help="without programmatic dependent launch")
    args = ap.parse_args()
    from engine.engine import init_inference
    from engine.request import SamplingParams

    bw = copy_bandwidth()
    hf = build_hf(args.shape)
    engine = init_inference(hf, {"dtype": str(SHAPES[args.shape]["dtype"]).removeprefix("torch."),
                                 "kv_cache_memory_fraction": 0.3, "max_num_seqs": max(args.batch, 8),
                                 "enable_cuda_graph": args.graphs, "enable_pdl": False if args.no_pdl else None})
    g = torch.Generator().manual_seed(0)
    if args.prefill:
        return profile_prefill(engine, hf, args, bw)
    for _ in range(args.batch):
        prompt = torch.randint(100, 30000, (args.context,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=4 * args.steps, ignore_eos=True))
    while not (engine.step_timings and engine.step_timings[-1].decode_only):
        engine.step()
    for _ in range(2):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    floor_us = floor_bytes_per_step(hf, args.batch, args.context) / bw * 1e6
    print(f"{torch.cuda.get_device_name()}  {args.shape}  batch {args.batch}  context {args.context}  "
          f"copy {bw / 1e9:.0f} GB/s")
    total = print_kernels(prof, args.steps)
    print(f"kernel time per step {total:.0f} us, floor {floor_us:.0f} us ({total / floor_us:.2f}x)")
    span = print_critical_path(prof, args.steps, hf.config.num_hidden_layers)
    print(f"critical path per step {span:.0f} us, floor {floor_us:.0f} us ({span / floor_us:.2f}x)")


def profile_prefill(engine: object, hf: object, args: argparse.Namespace, bw: float) -> None:
    import time

    from engine.request import SamplingParams

    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(100, 30000, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for _ in range(2):
        engine.generate(batch, sp)  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(batch, sp)  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(batch, sp)  # type: ignore[attr-defined]
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}  {args.shape}  prefill of {args.batch} x {args.context} tokens")
    total = print_kernels(prof, 1)
    print(f"kernel time {total:.0f} us, wall time {wall_us:.0f} us")


def print_kernels(prof: profile, steps: int) -> float:
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[e.name[:90]]
            k[0] += e.device_time_total / steps
            k[1] += 1 / steps
    total = sum(v[0] for v in per_kernel.values())
    for name, (us, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"{us:9.1f} us {us / total:6.1%} {calls:5.0f} calls  {name}")
    return total


def print_critical_path(prof: profile, steps: int, layers: int) -> float:
    """Charges each kernel end_i - max(end_j, j < i) (in start order): what it added to the span. Returns the
    mean span per step; prints the charges by kernel and one middle layer's kernels in order."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower())
    charged: dict[str, float] = defaultdict(float)
    rows, frontier = [], kernels[0][1] if kernels else 0.0
    for start, end, name in kernels:
        advance = max(0.0, end - frontier) if rows else end - start
        frontier = max(frontier, end)
        charged[name] += advance / steps
        rows.append((name, end - start, advance))
    span = sum(charged.values())
    print("critical path, us per step (kernel: charge, share)")
    for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[:10]:
        print(f"{us:9.1f} us {us / span:6.1%}  {name}")
    per_step = len(rows) // max(steps, 1)
    per_layer = max(1, (per_step - 4) // layers)
    first = per_step * (steps // 2) + per_layer * (layers // 2) + 2  # a middle layer of a middle step, roughly
    print("one layer (kernel: own duration, charge)")
    for name, dur, adv in rows[first:first + per_layer]:
        print(f"  {dur:7.2f} {adv:7.2f}  {name}")
    return span


if __name__ == "__main__":
    main()
