"""How much of a decode step's period is the graph, and how much happens between graphs (GPU side).

    python bench/step_gaps.py --shape llama-3.2-1b [--no-pdl]

Runs one 512-token prompt for 128 new tokens through the engine (CUDA graphs on) with CUDA events around
every graph replay, then replays the batch-1 graph back to back on its own. The period between graph
starts minus the graph alone is what a step spends outside its graph: the input copies, the sampler,
and any time the GPU waits for the CPU. Also times the sampler's pieces on logits of the model's vocab.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from bench.engine import SHAPES, build_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--no-pdl", action="store_true", help="without programmatic dependent launch")
    args = ap.parse_args()
    import engine.cuda_graphs as cuda_graphs
    from engine.engine import init_inference
    from engine.request import SamplingParams

    hf = build_hf(args.shape)
    eng = init_inference(hf, {"dtype": str(SHAPES[args.shape]["dtype"]).removeprefix("torch."),
                              "kv_cache_memory_fraction": 0.3, "max_num_seqs": 8, "enable_cuda_graph": True,
                              "enable_pdl": False if args.no_pdl else None})
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event, float]] = []
    replay = cuda_graphs.DecodeGraphs.run

    def timed_run(self: cuda_graphs.DecodeGraphs, inputs: object) -> torch.Tensor:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = replay(self, inputs)  # type: ignore[arg-type]
        end.record()
        marks.append((start, end, time.perf_counter()))
        return out

    cuda_graphs.DecodeGraphs.run = timed_run  # type: ignore[method-assign]
    prompt = torch.randint(100, 30000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    eng.generate([prompt], SamplingParams(max_new_tokens=128, ignore_eos=True))
    torch.cuda.synchronize()
    marks = marks[10:]  # past the first steps
    us = lambda a, b: a.elapsed_time(b) * 1e3  # noqa: E731
    graph = [us(a, b) for a, b, _ in marks]
    period = [us(marks[i][0], marks[i + 1][0]) for i in range(len(marks) - 1)]
    host = [(marks[i + 1][2] - marks[i][2]) * 1e6 for i in range(len(marks) - 1)]
    alone = time_us(eng.runner.graphs._graphs[1].replay, 50)  # type: ignore[union-attr]
    print(f"{torch.cuda.get_device_name()}  {args.shape}  pdl {eng.runner.pdl}")
    print(f"graph + its input copies, us p50 {statistics.median(graph):.0f}; period between graph starts p50 "
          f"{statistics.median(period):.0f} (min {min(period):.0f}); CPU period p50 {statistics.median(host):.0f}")
    outside = statistics.median(period) - alone
    print(f"the graph alone, back to back: {alone:.0f} us; outside the graph: {outside:.0f} us")
    logits = torch.randn(1, hf.config.vocab_size, device="cuda").to(SHAPES[args.shape]["dtype"])
    print(f"logits.float() {time_us(logits.float):.1f} us; .float().argmax(-1) "
          f"{time_us(lambda: logits.float().argmax(-1)):.1f} us")


def time_us(fn: object, n: int = 200) -> float:
    for _ in range(5):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()  # type: ignore[operator]
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / n


if __name__ == "__main__":
    main()
