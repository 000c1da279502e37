"""bench/engine.py's arithmetic on CPU: decode-step floor bytes and prefill FLOPs of tiny Llama and GPT-2 models
(built on the meta device), against parameter counts worked out by hand; and the targets' PASS/FAIL logic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

_path = Path(__file__).resolve().parents[2] / "bench" / "engine.py"
_spec = importlib.util.spec_from_file_location("bench_engine", _path)  # bench/ is not a package
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_engine"] = bench
_spec.loader.exec_module(bench)

H, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 100
HEAD_DIM = H // HEADS  # 16
# Llama layer: q, o (H*H), k, v (H * KV_HEADS*HEAD_DIM), gate, up, down (H*INTER), two RMSNorm weights (H).
LLAMA_BODY = LAYERS * (2 * H * H + 2 * H * KV_HEADS * HEAD_DIM + 3 * H * INTER + 2 * H) + H  # + final norm
assert LLAMA_BODY == 74048
G_H, G_LAYERS, G_HEADS, G_VOCAB, G_POS = 32, 2, 4, 50, 16
# GPT-2 layer: ln_1, ln_2 (weight + bias), c_attn (H x 3H + 3H), attn c_proj (H x H + H), c_fc (H x 4H + 4H),
# mlp c_proj (4H x H + H); then ln_f. wte is the lm_head (tied); wpe is a lookup table.
GPT2_BODY = G_LAYERS * (4 * G_H + (3 * G_H * G_H + 3 * G_H) + (G_H * G_H + G_H) + (4 * G_H * G_H + 4 * G_H)
                        + (4 * G_H * G_H + G_H)) + 2 * G_H
assert GPT2_BODY == 25472


def meta_model(cfg: Any, dtype: torch.dtype) -> Any:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def llama(tied: bool) -> Any:
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                   tie_word_embeddings=tied, max_position_embeddings=64)
    return meta_model(cfg, torch.bfloat16)


def gpt2() -> Any:
    cfg = transformers.GPT2Config(n_embd=G_H, n_layer=G_LAYERS, n_head=G_HEADS, vocab_size=G_VOCAB, n_positions=G_POS,
                                  bos_token_id=0, eos_token_id=0)
    return meta_model(cfg, torch.float16)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_params_floor_and_flops(tied: bool) -> None:
    model = llama(tied)
    split = bench.param_split(model)
    assert split["body"] == LLAMA_BODY and split["head"] == VOCAB * H
    assert split["lookup"] == (0 if tied else VOCAB * H)  # a tied table is the lm_head: read in full every step
    assert split["bytes_all"] == 2 * (LLAMA_BODY + VOCAB * H * (1 if tied else 2))
    assert split["bytes_read"] == 2 * (LLAMA_BODY + VOCAB * H)
    assert bench.dims(model.config) == dict(layers=LAYERS, hidden=H, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    # batch 3, context 10: K and V, per layer, per KV head, HEAD_DIM bf16 elements per token
    kv = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2 * 10 * 3
    assert kv == 7680
    assert bench.floor_bytes_per_step(model, 3, 10) == 2 * (74048 + 6400) + 7680 == 168576
    # 8-token prompt: 2 FLOPs per body parameter per token, the lm_head once, causal attention 2 * L^2 * H per layer
    assert bench.prefill_flops(model, 8) == 2 * 74048 * 8 + 2 * 6400 + 2 * 2 * 64 * 64 == 1213952


def test_llama_head_dim_from_config() -> None:
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=1, head_dim=32,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB)
    assert bench.dims(cfg)["head_dim"] == 32
    assert bench.dims(cfg.to_dict())["head_dim"] == 32


def test_gpt2_params_floor_and_flops() -> None:
    model = gpt2()
    split = bench.param_split(model)
    assert split["body"] == GPT2_BODY and split["head"] == G_VOCAB * G_H and split["lookup"] == G_POS * G_H
    assert split["bytes_all"] == 2 * (25472 + 1600 + 512) == 55168
    assert split["bytes_read"] == 2 * (25472 + 1600) == 54144
    assert bench.dims(model.config) == dict(layers=2, hidden=32, heads=4, kv_heads=4, head_dim=8)
    assert bench.dims(model.config.to_dict()) == bench.dims(model.config)  # n_layer/n_embd/n_head spelling
    kv = 2 * 2 * 4 * 8 * 2 * 10 * 3  # K+V, layers, heads (no GQA), head_dim, fp16, context 10, batch 3
    assert bench.floor_bytes_per_step(model, 3, 10) == 54144 + kv == 61824
    assert bench.prefill_flops(model, 8) == 2 * 25472 * 8 + 2 * 1600 + 2 * 2 * 64 * 32 == 418944


def row(batch: int, floor_tpot: float = 1.0, **who: dict[str, float]) -> dict[str, Any]:
    return dict(batch=batch, floor_tpot_ms=floor_tpot, floor_decode_tok_s=batch * 1000 / floor_tpot, **who)


def test_targets_pass_fail_and_missing() -> None:
    rows = [row(1, 5.0, ours=dict(tpot_ms=5.5, ttft_mfu=0.6), hf=dict(tpot_ms=30.0), hf_compile=dict(tpot_ms=5.0)),
            row(32, 8.0, ours=dict(steady_decode_tok_s=3500.0)),
            row(64, ours=dict(out_tok_s=9000.0), hf=dict(error="oom")),
            row(256, ours=dict(host_ms_p50=0.8))]
    got = {t["target"]: t["status"] for t in bench.targets(rows, "llama-3.1-8b")}
    assert got == {"batch-1 ms/tok / floor": "PASS",  # 1.1 <= 1.15
                   "batch-1 ms/tok speedup over hf eager": "PASS",  # 30 / 5.5 = 5.45
                   "batch-1 ms/tok speedup over hf compile": "FAIL",  # 5.0 / 5.5 < 1
                   "batch-32 steady decode tok/s / floor": "PASS",  # 3500 / 4000 = 0.875
                   "batch-64 out tok/s over hf eager": "n/a",  # transformers ran out of memory
                   "batch-256 host ms/step (median)": "PASS",
                   "batch-1 TTFT MFU": "PASS"}
    small = {t["target"]: t for t in bench.targets(rows[:1], "llama-3.2-1b")}
    assert "batch-1 TTFT MFU" not in small and "batch-32 steady decode tok/s / floor" not in small
    assert small["batch-1 ms/tok / floor"]["threshold"] == 1.4
    assert small["batch-256 host ms/step (median)"]["status"] == "n/a"
