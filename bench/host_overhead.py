"""The CPU's share of a decode step, with the model stubbed out: scheduler, step inputs, outputs.

    python bench/host_overhead.py [--batch 256] [--steps 200] [--profile]

Runs on any machine (no GPU): the demo model's engine on the CPU, its model call replaced by a stub that
returns a token per sequence at once, so what is timed is everything ``Engine.step`` does around the
model at a steady decode batch, including building the padded inputs a CUDA graph would get. It is the
floor of ``host ms/step`` in bench/engine.py, which adds the real launches (graph replay, copies, argmax).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.model_runner import ModelOutput  # noqa: E402
from engine.models.demo import write_demo_model  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from engine.scheduler import SchedulerOutput  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="print the top functions by own time")
    args = ap.parse_args()
    b = args.batch
    folder = Path(tempfile.mkdtemp())
    write_demo_model(folder)
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", num_kv_blocks=b * 64, max_num_seqs=b,
                                 max_num_batched_tokens=max(2048, b), async_scheduling=True), tokenizer=None)
    engine.tokenizer = None  # no text: as in bench/engine.py and the workers
    runner = engine.runner

    def stub(output: SchedulerOutput, after: object = None) -> ModelOutput:
        decode = output.is_decode
        runner.build_inputs(output, pad_to=b if decode else None, ahead=after is not None)
        # the real runner's tokens come from one tolist() of the device's: no per-request Python here either
        tokens = [7] * output.num_seqs if decode else [7 if s.samples else None for s in output.scheduled]
        return ModelOutput(tokens, torch.empty(0), decode)

    runner.execute = lambda output, use_graphs=True: stub(output)  # type: ignore[method-assign]
    runner.launch = lambda output, after=None, use_graphs=True: _Done(stub(output, after))  # type: ignore[method-assign]
    sp = SamplingParams(max_new_tokens=args.steps + 600, ignore_eos=True)
    for _ in range(b):
        engine.add_request(list(range(1, 300)), sp)
    while not engine.step_timings or not engine.step_timings[-1].decode_only:
        engine.step()
    engine.step_timings.clear()
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    for _ in range(args.steps):
        engine.step()
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    host = sorted(t.host_s * 1e3 for t in engine.step_timings if t.decode_only and t.num_seqs == b)
    print(f"batch {b}: host ms per decode step, model stubbed: median {statistics.median(host):.3f}  "
          f"p90 {host[int(0.9 * len(host))]:.3f}  ({len(host)} steps)")


class _Done:
    def __init__(self, output: ModelOutput) -> None:
        self.output = output

    def wait(self) -> ModelOutput:
        return self.output


if __name__ == "__main__":
    main()
