"""Our engine against transformers `generate` on one GPU: same model, prompts and lengths, one run.

    python bench/engine.py --shape llama-3.1-8b [--batches 1,32,64,256] [--prompt-len 512] [--new-tokens 128]
                           [--compile-batches 1] [--no-compile] [--eager] [--json out.json]

The model has random weights in the shape of a real one, built on the GPU (nothing is downloaded); prompts
are random ids, every request makes exactly --new-tokens tokens (ignore_eos; min_new_tokens for transformers).
Measured in the same run: copy bandwidth (device-to-device, read + write) and the matmul rate (8192^3 in the
shape's dtype). Per batch, for our engine, transformers eager `generate` (DynamicCache) and, at
--compile-batches, transformers with a static cache and torch.compile (`cache_implementation="static"` +
`CompileConfig`, mode reduce-overhead; its compile warm-up is two untimed generates):
  TTFT           generate with max_new_tokens=1 (the whole batch's prefill), ms
  ms/tok         (full generate - TTFT) / (new tokens - 1): time per output token of a decode step
  decode tok/s   batch * 1000 / ms/tok;  out tok/s = batch * new tokens / full generate time
  floor          bandwidth floor of a decode step: (weight bytes a step reads + KV bytes at the mean
                 context prompt + new/2) / copy bandwidth; input-embedding tables other than the lm_head
                 are left out (a step reads `batch` rows of them). The JSON also has all weight bytes.
  MFU            prefill FLOPs (prefill_flops) / TTFT / measured matmul rate
  host ms/step   engine.step_timings of the decode-only steps at the full batch: median (p90) of the CPU
                 time of a step not spent waiting for the GPU
Then the issue's targets that apply to the shape, PASS/FAIL. Progress is printed and the JSON rewritten after
every batch, so a run cut short keeps what it measured; a measurement that runs out of memory reads "oom".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         dtype=torch.bfloat16),
    "llama-3.1-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         dtype=torch.bfloat16),
    "gpt2-xl": dict(family="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, dtype=torch.float16),
}
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192, rope_theta=500000.0)
OOM = "oom"


def build_hf(shape: str) -> Any:
    import transformers

    spec = dict(SHAPES[shape])
    family, dtype = spec.pop("family"), spec.pop("dtype")
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_positions=1024, **spec)
    else:
        cfg = transformers.LlamaConfig(max_position_embeddings=131072, rope_scaling=LLAMA3_ROPE, **spec)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


# -- model arithmetic (pure; tests/unit/test_bench_engine.py runs it on CPU) -----------------------------------
def _cfg(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` set in a config (object or dict); GPT-2 spells them n_layer, n_embd, n_head."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
        if value is not None:
            return value
    if default is None:
        raise KeyError(f"config has none of {names}")
    return default


def dims(cfg: Any) -> dict[str, int]:
    heads = _cfg(cfg, "num_attention_heads", "n_head")
    hidden = _cfg(cfg, "hidden_size", "n_embd")
    return dict(layers=_cfg(cfg, "num_hidden_layers", "n_layer"), hidden=hidden, heads=heads,
                kv_heads=_cfg(cfg, "num_key_value_heads", default=heads),
                head_dim=_cfg(cfg, "head_dim", default=hidden // heads))


def param_split(model: Any) -> dict[str, int]:
    """Parameter counts (tied weights once): body (no embedding table, no lm_head), lookup (input-embedding
    tables that are not the lm_head), head (lm_head), and bytes: all, and those a decode step reads."""
    head = model.get_output_embeddings().weight
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    out = dict(body=0, lookup=0, head=head.numel(), bytes_all=0, bytes_read=0)
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()
        out["bytes_all"] += nbytes
        if id(p) in lookups:
            out["lookup"] += p.numel()
            continue
        out["bytes_read"] += nbytes
        if p is not head:
            out["body"] += p.numel()
    return out


def floor_bytes_per_step(model: Any, batch: int, context: int) -> int:
    """Bytes one decode step must read: the weights it uses plus K and V of `context` tokens per sequence."""
    d = dims(model.config)
    kv = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * model.dtype.itemsize * context * batch
    return param_split(model)["bytes_read"] + kv


def prefill_flops(model: Any, prompt_len: int) -> int:
    """FLOPs of one prompt's prefill: 2 per body parameter per token, the lm_head for the last token only, and
    causal attention (QK^T and PV, half of L^2 each): 2 * L^2 * heads * head_dim per layer."""
    d, p, n = dims(model.config), param_split(model), prompt_len
    return 2 * p["body"] * n + 2 * p["head"] + 2 * d["layers"] * n * n * d["heads"] * d["head_dim"]


# -- timing -----------------------------------------------------------------------------------------------------
def timed_ms(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (timed_ms(lambda: dst.copy_(src), 20) * 1e-3)  # read + write


def matmul_rate(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return 2 * n**3 / (timed_ms(lambda: a @ b, 10, warmup=3) * 1e-3)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(batch)]


def measure(run: Any, b: int, new: int, repeats: int, warmup: int) -> dict[str, Any]:
    """TTFT and full-generate medians -> ms/tok, decode tok/s, out tok/s; {"error": "oom"} when out of memory."""
    try:
        ttft, full = timed_ms(lambda: run(1), repeats, warmup), timed_ms(lambda: run(new), repeats, warmup)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(error=OOM)
    tpot = (full - ttft) / (new - 1)
    return dict(ttft_ms=ttft, full_ms=full, tpot_ms=tpot, decode_tok_s=b * 1000 / tpot, out_tok_s=b * new * 1000 / full)


def ours_run(engine: Any, batch: list[list[int]], calls: list[list[Any]]) -> Any:
    from engine.request import SamplingParams

    def run(n: int) -> None:
        timings = getattr(engine, "step_timings", None)
        if timings is not None:
            timings.clear()
        try:
            engine.generate(batch, SamplingParams(max_new_tokens=n, ignore_eos=True))
        except torch.cuda.OutOfMemoryError:
            for request_id in list(getattr(engine.scheduler, "_requests", {})):  # leave the engine empty
                engine.abort_request(request_id)
            raise
        if timings is not None and n > 1:
            calls.append([t for t in timings if t.decode_only and t.num_seqs == len(batch)])
    return run


def step_stats(calls: list[list[Any]], batch: int) -> dict[str, Any]:
    """Decode-only steps at the full batch. With async scheduling a step's wall time is the GPU's time per
    step, so batch / its median is the steady decode rate (the figure excludes the staggered start and end
    that chunked prefill gives a batch, which full-generate ms/tok includes)."""
    steps = [t for call in calls for t in call]
    if not steps:
        return {}
    host = sorted(t.host_s * 1000 for t in steps)
    wall = statistics.median(t.wall_s * 1000 for t in steps)
    return dict(host_ms_p50=statistics.median(host), host_ms_p90=host[min(len(host) - 1, int(0.9 * len(host)))],
                wall_ms_p50=wall, steady_decode_tok_s=batch * 1000 / wall, decode_steps=len(steps),
                cuda_graph_fraction=sum(t.cuda_graph for t in steps) / len(steps),
                ahead_fraction=sum(t.ahead for t in steps) / len(steps))


def hf_run(hf: Any, batch: list[list[int]], **extra: Any) -> Any:
    ids = torch.tensor(batch, device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids), **extra)
    return lambda n: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# -- report -----------------------------------------------------------------------------------------------------
def targets(rows: list[dict[str, Any]], shape: str) -> list[dict[str, Any]]:
    by_b = {r["batch"]: r for r in rows}
    get = lambda b, who, key: by_b.get(b, {}).get(who, {}).get(key)
    ratio = lambda x, y: x / y if isinstance(x, float) and isinstance(y, float) else None
    big = shape == "llama-3.1-8b"
    out = [("batch-1 ms/tok / floor", ratio(get(1, "ours", "tpot_ms"), by_b.get(1, {}).get("floor_tpot_ms")),
            "<=", 1.15 if big else 1.4),
           ("batch-1 ms/tok speedup over hf eager", ratio(get(1, "hf", "tpot_ms"), get(1, "ours", "tpot_ms")), ">=", 5),
           ("batch-1 ms/tok speedup over hf compile", ratio(get(1, "hf_compile", "tpot_ms"), get(1, "ours", "tpot_ms")),
            ">=", 1),
           ("batch-64 out tok/s over hf eager", ratio(get(64, "ours", "out_tok_s"), get(64, "hf", "out_tok_s")),
            ">=", 3),
           ("batch-256 host ms/step (median)", get(256, "ours", "host_ms_p50"), "<", 1)]
    if big:
        out.insert(3, ("batch-32 steady decode tok/s / floor", ratio(get(32, "ours", "steady_decode_tok_s"),
                                                                      by_b.get(32, {}).get("floor_decode_tok_s")),
                       ">=", 0.8))
        out.append(("batch-1 TTFT MFU", get(1, "ours", "ttft_mfu"), ">=", 0.5))
    result = []
    compare = {"<=": lambda x, y: x <= y, "<": lambda x, y: x < y, ">=": lambda x, y: x >= y}
    for name, value, op, limit in out:
        ok = None if value is None else compare[op](value, limit)
        result.append(dict(target=name, value=value, op=op, threshold=limit,
                           status="n/a" if ok is None else "PASS" if ok else "FAIL"))
    return result


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else x if isinstance(x, str) else format(x, spec)


def brief(d: dict[str, Any]) -> str:
    return "  ".join(f"{k} {fmt(v, '.3g')}" for k, v in d.items())


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [("batch", None, "batch", "d"), ("TTFT ours", "ours", "ttft_ms", ".1f"), ("TTFT hf", "hf", "ttft_ms", ".1f"),
            ("ms/tok ours", "ours", "tpot_ms", ".2f"), ("hf", "hf", "tpot_ms", ".2f"),
            ("hf-comp", "hf_compile", "tpot_ms", ".2f"), ("floor", None, "floor_tpot_ms", ".2f"),
            ("dec tok/s ours", "ours", "decode_tok_s", ".0f"), ("steady", "ours", "steady_decode_tok_s", ".0f"),
            ("hf", "hf", "decode_tok_s", ".0f"),
            ("floor", None, "floor_decode_tok_s", ".0f"), ("out tok/s ours", "ours", "out_tok_s", ".0f"),
            ("hf", "hf", "out_tok_s", ".0f"), ("MFU", "ours", "ttft_mfu", ".2f"),
            ("host p50", "ours", "host_ms_p50", ".3f"), ("p90", "ours", "host_ms_p90", ".3f")]
    print("  ".join(f"{c[0]:>{max(len(c[0]), 7)}}" for c in cols), flush=True)
    for r in rows:
        cells = []
        for title, who, key, spec in cols:
            src = r if who is None else r.get(who) or {}
            cells.append(f"{fmt(src.get(key, src.get('error')), spec):>{max(len(title), 7)}}")
        print("  ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--batches", default="1,32,64,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--compile-batches", default="1", help="batches with the transformers static+compile baseline")
    ap.add_argument("--no-compile", action="store_true", help="skip the transformers torch.compile baseline")
    ap.add_argument("--eager", action="store_true", help="our engine without CUDA graphs")
    ap.add_argument("--no-pdl", action="store_true", help="our engine without programmatic dependent launch")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (ms/tok needs a decode step)")
    import transformers

    from engine.engine import init_inference

    dtype = SHAPES[args.shape]["dtype"]
    bw, rate = copy_bandwidth(), matmul_rate(dtype)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               transformers=transformers.__version__, triton=triton_version, shape=args.shape,
               dtype=str(dtype).removeprefix("torch."), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
               cuda_graph=not args.eager, pdl_requested=not args.no_pdl, copy_bytes_per_s=bw, matmul_flops_per_s=rate)
    print(f"{env['gpu']}  torch {env['torch']}  transformers {env['transformers']}  triton {triton_version}  "
          f"{args.shape} {env['dtype']}  copy {bw / 1e9:.0f} GB/s  matmul {rate / 1e12:.0f} TFLOP/s  "
          f"prompt {args.prompt_len} new {args.new_tokens}  cuda graphs {'off' if args.eager else 'on'}  "
          f"pdl {'off' if args.no_pdl else 'auto'}", flush=True)

    hf = build_hf(args.shape)
    engine = init_inference(hf, {"dtype": env["dtype"], "enable_cuda_graph": not args.eager,
                                 "kv_cache_memory_fraction": 0.5, "max_num_seqs": 256,
                                 "enable_pdl": False if args.no_pdl else None})
    env["pdl"] = engine.runner.pdl
    split, flops = param_split(hf), prefill_flops(hf, args.prompt_len)
    env.update(weight_bytes_all=split["bytes_all"], weight_bytes_read_per_step=split["bytes_read"],
               prefill_flops_per_prompt=flops, step_timings=getattr(engine, "step_timings", None) is not None)
    compile_info: dict[str, Any] = dict(ran=False, error=None, warmup_s={}, config=None)
    compile_batches = set() if args.no_compile else {int(x) for x in args.compile_batches.split(",") if x}
    rows: list[dict[str, Any]] = []
    context = args.prompt_len + args.new_tokens // 2
    for i, b in enumerate(int(x) for x in args.batches.split(",")):
        batch = prompts(b, args.prompt_len, hf.config.vocab_size)
        floor_ms = floor_bytes_per_step(hf, b, context) / bw * 1000
        row: dict[str, Any] = dict(batch=b, floor_tpot_ms=floor_ms, floor_decode_tok_s=b * 1000 / floor_ms)
        calls: list[list[Any]] = []
        row["ours"] = measure(ours_run(engine, batch, calls), b, args.new_tokens, 3 if b == 1 else 2, 1)
        if "ttft_ms" in row["ours"]:
            row["ours"].update(ttft_mfu=b * flops / (row["ours"]["ttft_ms"] * 1e-3) / rate, **step_stats(calls[1:], b))
        print(f"[batch {b}] ours: {brief(row['ours'])}", flush=True)
        row["hf"] = measure(hf_run(hf, batch), b, args.new_tokens, 2 if b == 1 else 1, 1 if i == 0 else 0)
        print(f"[batch {b}] hf eager: {brief(row['hf'])}", flush=True)
        if b in compile_batches and compile_info["error"] is None:
            try:
                cc = transformers.CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
                compile_info["config"] = cc.to_dict()
                run = hf_run(hf, batch, cache_implementation="static", compile_config=cc)
                start = time.perf_counter()
                run(args.new_tokens)
                run(args.new_tokens)
                torch.cuda.synchronize()
                compile_info["warmup_s"][b] = time.perf_counter() - start
                print(f"[batch {b}] hf compile warm-up (2 generates) took {compile_info['warmup_s'][b]:.1f} s",
                      flush=True)
                row["hf_compile"] = measure(run, b, args.new_tokens, 2 if b == 1 else 1, 0)
                compile_info["ran"] = True
                print(f"[batch {b}] hf static+compile: {brief(row['hf_compile'])}", flush=True)
            except Exception as e:  # any failure of the baseline is a result to report
                compile_info["error"] = first_line(e)
                torch.cuda.empty_cache()
                print(f"compile baseline did not run: {compile_info['error']}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
        if args.json:
            doc = dict(environment=env, compile_baseline=compile_info, rows=rows, targets=targets(rows, args.shape))
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str))

    print_table(rows)
    print("targets:", flush=True)
    for t in targets(rows, args.shape):
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {t['target']:<40} {value:>9} {t['op']} {t['threshold']:<5} {t['status']}", flush=True)
    if compile_info["error"]:
        print(f"  (transformers static cache + torch.compile did not run: {compile_info['error']})", flush=True)


if __name__ == "__main__":
    main()
