"""Our models against transformers on random checkpoints: greedy tokens identical, logits within fp32 tolerance."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams

PROMPT_LENGTHS = (1, 7, 33, 130, 300)
NEW_TOKENS = 8

# (family, config overrides): GQA / MHA / MQA, tied / untied, odd head counts, biases, rope scaling.
SHAPES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied-3heads": ("llama", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                            tie_word_embeddings=True)),
    "llama-mqa-bias-llama3rope": ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
                                                attention_bias=True, rope_scaling=dict(
                                                    rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral-headdim32": ("mistral", dict(head_dim=32, sliding_window=None)),
    "qwen2-gqa-tied-6heads": ("qwen2", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                            tie_word_embeddings=True)),
    "gpt2": ("gpt2", {}),
    "gpt2-3heads-exact-gelu": ("gpt2", dict(n_embd=48, n_head=3, activation_function="gelu")),
}


def prompts(vocab: int = 500) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def small_steps_engine(model_dir: Any, **overrides: Any) -> Engine:
    """Budget and chunk small enough that long prompts span many steps and share them with decodes."""
    cfg = dict(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=512,
               max_num_batched_tokens=40, prefill_chunk_size=24, max_num_seqs=8)
    return Engine(EngineConfig(**{**cfg, **overrides}))


def run_recording(engine: Engine, batch: list[list[int]], n: int) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Drive the engine step by step; keep every sampled logit row and every scheduler output."""
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in batch]
    logits: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
    steps = []
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        result = engine.runner.execute(out)
        rows = iter(result.logits)
        for item in out.scheduled:
            if item.samples:
                logits[item.request.request_id].append(next(rows))
        steps.append([(s.num_new_tokens, s.samples) for s in out.scheduled])
        engine.scheduler.update_from_output(out, result.sampled_token_ids)
    return logits, steps


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_tokens_and_logits_match_transformers(shape: str, make_checkpoint: Any) -> None:
    family, overrides = SHAPES[shape]
    model_dir = make_checkpoint(family, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = prompts()

    engine = small_steps_engine(model_dir)
    outputs = engine.generate(batch, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, out in zip(batch, outputs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref, f"{shape}: prompt of {len(prompt)} tokens diverged"

    # The outputs depend on the context (a degenerate random model would repeat one token).
    continuations = {tuple(o.token_ids) for o in outputs}
    assert len(continuations) == len(batch)
    assert len({t for o in outputs for t in o.token_ids}) > NEW_TOKENS

    logits, steps = run_recording(small_steps_engine(model_dir), batch, NEW_TOKENS)
    for prompt, out, rows in zip(batch, outputs, logits.values(), strict=True):
        full = torch.tensor([prompt + out.token_ids[:-1]])
        with torch.no_grad():
            ref_logits = hf(full).logits[0, len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(rows), ref_logits, rtol=1e-4, atol=1e-4)

    # The schedule really was SplitFuse: a step mixing a decode with a prompt chunk, prompts split.
    assert any(any(n == 1 and s for n, s in st) and any(n > 1 for n, _ in st) for st in steps)
    assert any(any(n > 1 and not s for n, s in st) for st in steps)


def test_preempted_requests_match_transformers(make_checkpoint: Any) -> None:
    """A KV pool too small for the batch forces recompute; tokens must not change."""
    model_dir = make_checkpoint("llama")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = [p[:40] for p in prompts()]
    engine = small_steps_engine(model_dir, num_kv_blocks=30, max_num_batched_tokens=64, prefill_chunk_size=64)
    outputs = engine.generate(batch, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert sum(o.num_preemptions for o in outputs) > 0, "the pool was meant to be too small"
    for prompt, out in zip(batch, outputs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
    assert engine.scheduler.block_manager.num_free_blocks == 30
