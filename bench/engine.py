"""Our engine against transformers `generate` on one GPU, same model, prompts and lengths, one run.

The model has random weights in the shape of a real one, built on the GPU (nothing is downloaded).
Batch 1: TTFT and ms per output token, against the bandwidth floor (weight bytes + KV bytes read per
step, over the device-to-device copy bandwidth measured in the same run). Larger batches: output
tokens/s. Usage: python bench/engine.py [--shape llama-3.2-1b] [--batches 1,32] [--json out.json]
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


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms * 1e-3)  # read + write


def _cuda_ms(fn: Any, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(batch)]


def ours(engine: Any, batch: list[list[int]], new: int) -> float:
    from engine.request import SamplingParams

    sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
    return _cuda_ms(lambda: engine.generate(batch, sp), 3)


def theirs(hf: Any, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch, device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        return _cuda_ms(lambda: hf.generate(ids, **kw), 3)


def floor_ms_per_token(hf: Any, batch: int, context: int, bandwidth: float) -> float:
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    cfg = hf.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2 * context * batch
    return (weights + kv) / bandwidth * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    from engine.engine import init_inference

    bw = copy_bandwidth()
    hf = build_hf(args.shape)
    engine = init_inference(hf, {"dtype": str(SHAPES[args.shape]["dtype"]).removeprefix("torch."),
                                 "kv_cache_memory_fraction": 0.5, "max_num_seqs": 256})
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        batch = prompts(b, args.prompt_len, hf.config.vocab_size)
        ttft_ours, ttft_hf = ours(engine, batch, 1), theirs(hf, batch, 1)
        full_ours, full_hf = ours(engine, batch, args.new_tokens), theirs(hf, batch, args.new_tokens)
        per_tok = lambda full, first: (full - first) / (args.new_tokens - 1)  # noqa: E731
        row = dict(batch=b, ttft_ms_ours=ttft_ours, ttft_ms_hf=ttft_hf, tpot_ms_ours=per_tok(full_ours, ttft_ours),
                   tpot_ms_hf=per_tok(full_hf, ttft_hf),
                   floor_tpot_ms=floor_ms_per_token(hf, b, args.prompt_len + args.new_tokens // 2, bw))
        row["tok_s_ours"] = b * 1000 / row["tpot_ms_ours"]
        row["tok_s_hf"] = b * 1000 / row["tpot_ms_hf"]
        rows.append(row)
    print(f"{torch.cuda.get_device_name()}  {args.shape}  prompt {args.prompt_len}  new {args.new_tokens}  "
          f"copy {bw / 1e9:.0f} GB/s  (transformers eager generate as baseline)")
    print(f"{'batch':>5} {'TTFT ours':>10} {'TTFT hf':>9} {'ms/tok ours':>12} {'ms/tok hf':>10} {'floor':>7} "
          f"{'tok/s ours':>11} {'tok/s hf':>9}")
    for r in rows:
        print(f"{r['batch']:5d} {r['ttft_ms_ours']:10.1f} {r['ttft_ms_hf']:9.1f} {r['tpot_ms_ours']:12.2f} "
              f"{r['tpot_ms_hf']:10.2f} {r['floor_tpot_ms']:7.2f} {r['tok_s_ours']:11.0f} {r['tok_s_hf']:9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(shape=args.shape, copy_bytes_per_s=bw, rows=rows), indent=2))


if __name__ == "__main__":
    main()
