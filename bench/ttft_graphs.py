"""A lone prompt's TTFT with and without its prefill graph, in one process (rounds interleaved).

    python bench/ttft_graphs.py [--shape llama-3.1-8b] [--prompt-len 512] [--rounds 2] [--repeats 5] [--json F]

Builds the random model of the shape on the GPU (as bench/engine.py does), one engine with CUDA graphs, and
times ``generate`` of one prompt for one token (its prefill and first sample) with the engine's prefill graphs
in place and with them taken away (the step then runs eagerly), in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from bench.engine import SHAPES, build_hf, prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from engine.engine import init_inference
    from engine.request import SamplingParams

    hf = build_hf(args.shape)
    dtype = str(SHAPES[args.shape]["dtype"]).removeprefix("torch.")
    engine = init_inference(hf, {"dtype": dtype, "enable_cuda_graph": True, "kv_cache_memory_fraction": 0.5})
    prompt = prompts(1, args.prompt_len, hf.config.vocab_size)
    del hf
    torch.cuda.empty_cache()
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
    graphs = engine.runner.prefill_graphs
    ms: dict[str, list[float]] = {"graph": [], "eager": []}
    for mode in ("graph", "eager") * args.rounds:
        engine.runner.prefill_graphs = graphs if mode == "graph" else None
        engine.generate(prompt, sp)  # warm-up of this mode
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate(prompt, sp)
            torch.cuda.synchronize()
            ms[mode].append((time.perf_counter() - start) * 1e3)
    print(f"{torch.cuda.get_device_name()}  {args.shape}  prompt {args.prompt_len}")
    for mode, values in ms.items():
        print(f"TTFT {mode:<5}: median {statistics.median(values):.2f} ms  "
              f"min {min(values):.2f}  max {max(values):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=args.shape, prompt_len=args.prompt_len, ttft_ms=ms), indent=1))


if __name__ == "__main__":
    main()
