"""The prompt-chunk graph path (one sequence's chunk padded to a token size) against the eager path, on the CPU.

Capture needs CUDA (test_cuda_graphs_gpu.py); here the graphs are not captured and their static buffers
run through the model eagerly, which checks everything around the replay: the padding sequence that must
write no KV and must not be attended to, block tables copied into the wider static table, chunks that
continue a cached context, and only the sampled rows going through the lm_head.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import PrefillGraphs, prefill_token_sizes
from engine.engine import Engine
from engine.request import SamplingParams


def _engine(ckpt: Any, static_prefill: bool) -> Engine:
    # a small pool recycles blocks quickly: a padding token that wrote KV would corrupt a live request
    eng = Engine(EngineConfig(model=str(ckpt), dtype="float32", block_size=4, num_kv_blocks=48,
                              max_num_batched_tokens=48, prefill_chunk_size=40, max_num_seqs=4))
    if static_prefill:
        r = eng.runner
        r.prefill_graphs = PrefillGraphs(r.model, r.max_prefill_graph_tokens, r.builder.max_blocks_per_seq,
                                         r.max_seq_len, r.device)
    return eng


def _run(eng: Engine) -> list[list[int]]:
    """Prompts of 1..90 tokens, alone (one-sequence chunks, the long ones in several) and then three at once."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 400, (n,), generator=g).tolist() for n in (1, 5, 16, 17, 33, 40, 41, 90)]
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    outs = [eng.generate([p], sp)[0].token_ids for p in prompts]
    return outs + [o.token_ids for o in eng.generate(prompts[3:6], sp)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_prefill_buffers_give_the_eager_tokens(make_checkpoint: Any, family: str) -> None:
    ckpt = make_checkpoint(family)
    eager, static = _engine(ckpt, False), _engine(ckpt, True)
    assert static.runner.prefill_graphs is not None and static.runner.prefill_graphs.sizes == [16, 32, 40]
    want, got = _run(eager), _run(static)
    assert got == want
    graphed = [t for t in static.step_timings if t.cuda_graph]
    assert graphed and all(t.num_seqs == 1 and not t.decode_only for t in graphed)
    assert {t.num_tokens for t in graphed} - {16, 32, 40}, "no chunk needed padding"  # e.g. 17 tokens -> 32
    assert any(t.num_seqs > 1 and not t.decode_only and not t.cuda_graph for t in static.step_timings)
    assert static.scheduler.block_manager.num_used_blocks == 0


def test_prefill_token_sizes() -> None:
    assert prefill_token_sizes(16) == [16]
    assert prefill_token_sizes(40) == [16, 32, 40]
    assert prefill_token_sizes(512) == [16, 32, 64, 128, 256, 384, 512]
    assert prefill_token_sizes(2048)[-4:] == [1280, 1536, 1792, 2048]
    assert prefill_token_sizes(300) == [16, 32, 64, 128, 256, 300]
