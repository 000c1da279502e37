"""Offline throughput of our Engine against transformers ``generate``: same model, same prompts, greedy.

Prints one table row per (system, batch, new tokens); the rows with new = 1 time a generate of one
token, the TTFT of a whole batch. Figures are medians of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ on sys.path, not the repo root that holds engine/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from engine.config import torch_dtype  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.models.demo import write_demo_model  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

Prompts = list[list[int]]
Generate = Callable[[Prompts, int], Prompts]  # (prompts, new tokens) -> the new token ids of each


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the demo model, written to a temp dir)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_prompts(batch: int, length: int, vocab_size: int, avoid: set[int], seed: int) -> Prompts:
    """``batch`` prompts of ``length`` random token ids from the vocabulary, none of them in ``avoid``."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in avoid]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(batch)]


def engine_generate(engine: Engine) -> Generate:
    def run(prompts: Prompts, new_tokens: int) -> Prompts:
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        return [out.token_ids for out in outputs]

    return run


def hf_generate(model: Any, device: str, pad_token_id: int) -> Generate:
    def run(prompts: Prompts, new_tokens: int) -> Prompts:
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding, an all-ones mask
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=pad_token_id,
            )
        return out[:, ids.shape[1]:].tolist()  # .tolist() waits for the device

    return run


def timed(run: Generate, prompts: Prompts, new_tokens: int, repeats: int) -> tuple[float, Prompts]:
    """Median wall seconds of ``repeats`` runs after one warm-up, and the last run's tokens."""
    tokens = run(prompts, new_tokens)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(prompts, new_tokens)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tokens


def row(system: str, batch: int, prompt_len: int, new_tokens: int, seconds: float) -> dict[str, Any]:
    return {
        "system": system, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "seconds": seconds, "tokens_per_s": batch * new_tokens / seconds,
        "ms_per_token": 1000 * seconds / new_tokens if batch == 1 else None, "speedup": None,
    }


def model_shape(hf: Any) -> dict[str, int]:
    c = hf.config
    return {
        "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads), "vocab": c.vocab_size,
        "params": sum(p.numel() for p in hf.parameters()),
    }


def hardware(device: str) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"cpu": cpu, "gpu": gpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def measure(systems: dict[str, Generate], args: argparse.Namespace, vocab: int, eos: set[int]) -> tuple[
        list[dict[str, Any]], dict[str, Any]]:
    """Every (new tokens, batch, system) row, and the greedy-token check on the largest batch."""
    rows, tokens = [], {}
    batches = [int(b) for b in args.batches.split(",")]
    for new_tokens in (args.new_tokens, 1):
        for batch in batches:
            prompts = make_prompts(batch, args.prompt_len, vocab, eos, args.seed + batch)
            seconds = {}
            for name, run in systems.items():
                seconds[name], tokens[name, batch, new_tokens] = timed(run, prompts, new_tokens, args.repeats)
                rows.append(row(name, batch, args.prompt_len, new_tokens, seconds[name]))
            rows[-len(systems)]["speedup"] = seconds["transformers"] / seconds["splitserve"]
    big = max(batches)
    ours, theirs = tokens["splitserve", big, args.new_tokens], tokens["transformers", big, args.new_tokens]
    return rows, compare(ours, theirs, big, eos)


def compare(ours: Prompts, theirs: Prompts, batch: int, eos: set[int]) -> dict[str, Any]:
    """Which sequences differ; transformers' min_new_tokens bans EOS where ignore_eos keeps it, so say if
    ours holds an EOS (an explained difference, still a difference)."""
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    eos_in_ours = [i for i in diff if eos.intersection(ours[i])]
    return {"batch": batch, "identical": not diff, "differing_sequences": diff, "differing_with_eos": eos_in_ours}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'system':<13}{'batch':>6}{'prompt':>7}{'new':>5}{'seconds':>10}{'tok/s':>10}{'ms/token':>10}"
            f"{'speed-up':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = f"{r['ms_per_token']:.2f}" if r["ms_per_token"] is not None else "-"
        up = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        print(f"{r['system']:<13}{r['batch']:>6}{r['prompt_len']:>7}{r['new_tokens']:>5}{r['seconds']:>10.3f}"
              f"{r['tokens_per_s']:>10.1f}{ms:>10}{up:>10}")


def print_check(check: dict[str, Any]) -> None:
    if check["identical"]:
        print(f"greedy tokens at batch {check['batch']}: IDENTICAL to transformers")
    else:
        print(f"!!! greedy tokens at batch {check['batch']} DIFFER from transformers "
              f"in sequences {check['differing_sequences']} (of them, holding an EOS: "
              f"{check['differing_with_eos']}) !!!")


def bench(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    engine = Engine(EngineConfig(model=model_dir, dtype=args.dtype, device=args.device))
    eos = set(engine.eos_token_ids)
    pad = min(eos) if eos else 0
    systems = {"splitserve": engine_generate(engine), "transformers": hf_generate(hf, args.device, pad)}
    rows, check = measure(systems, args, hf.config.vocab_size, eos)
    return {"hardware": hardware(args.device), "model": {"path": args.model or "demo", **model_shape(hf)},
            "dtype": args.dtype, "device": args.device, "repeats": args.repeats, "rows": rows, "greedy_check": check}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(write_demo_model(Path(tmp) / "demo"))
        result = bench(args, model_dir)
    hw, m = result["hardware"], result["model"]
    print(f"{hw['gpu'] or hw['cpu']}, {hw['torch_threads']} torch threads, torch {hw['torch']}, "
          f"transformers {hw['transformers']}, {result['device']} {result['dtype']}; model {m['path']}: "
          f"{m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, {m['kv_heads']} kv heads, "
          f"vocab {m['vocab']}, {m['params'] / 1e6:.2f}M params; median of {args.repeats}, rows with new=1 are TTFT")
    print_table(result["rows"])
    print_check(result["greedy_check"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
