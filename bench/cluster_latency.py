"""What the cluster adds per request: the in-process engine against the same requests through gRPC.

Starts a LocalCluster (gateway + 1 prefill + 1 decode worker, CPU) on a model, sends requests one at
a time so nothing queues, and compares each request's latency with the engine's own on the same
prompt. The difference is the gateway, the RPCs, Redis look-ups and (for prompts that go through the
prefill worker) the KV transfer. Usage: python bench/cluster_latency.py [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.models.demo import write_demo_model  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from splitserve.client import Client  # noqa: E402
from splitserve.launcher import LocalCluster  # noqa: E402

# prompt length -> where the gateway sends it (short prompts skip the prefill worker)
CASES = {"short prompt, decode worker only": 16, "long prompt, prefill -> KV transfer -> decode": 512}


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10)
    return {"p50": statistics.median(samples), "p90": q[-1], "mean": statistics.fmean(samples)}


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    # One thread per process on both sides: on a small machine, torch's thread pools in four processes
    # oversubscribe the cores and the comparison would measure that instead of the cluster's overhead.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = args.model or str(write_demo_model(Path(tempfile.mkdtemp()) / "demo"))
    opts = {"dtype": "float32", "num_kv_blocks": 1024}
    engine = Engine(EngineConfig(model=model, **opts))
    sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    with LocalCluster(model, worker_options=opts, gateway_options={"short_prompt_threshold": 64}) as cluster, \
            Client(cluster.address, timeout=60) as client:
        for name, n in CASES.items():
            prompt = [(i * 31) % 400 + 1 for i in range(n)]
            direct = timed(lambda p=prompt: engine.generate([p], sampling), args.repeats)
            results: list = []
            through = timed(lambda p=prompt, out=results: out.append(
                client.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True)), args.repeats)
            transfer = [r.timings["transfer_ms"] for r in results]
            rows.append({"case": name, "prompt_tokens": n, "new_tokens": args.new_tokens,
                         "engine_ms": percentiles(direct), "cluster_ms": percentiles(through),
                         "added_ms_p50": statistics.median(through) - statistics.median(direct),
                         "transfer_ms_p50": statistics.median(transfer),
                         "transfer_bytes": results[-1].timings["transfer_bytes"]})
    print(f"{'case':48} {'engine p50':>11} {'cluster p50':>12} {'added p50':>10} {'transfer p50':>13}")
    for r in rows:
        print(f"{r['case']:48} {r['engine_ms']['p50']:9.1f}ms {r['cluster_ms']['p50']:10.1f}ms "
              f"{r['added_ms_p50']:8.1f}ms {r['transfer_ms_p50']:11.2f}ms")
    print(f"{args.new_tokens} new tokens per request, {args.repeats} sequential requests per case, CPU, model {model}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
