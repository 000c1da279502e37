"""The decode-graph path (static buffers, padding to bucket sizes) against the eager path, on the CPU.

Capture itself needs CUDA (test_cuda_graphs_gpu.py); here the graphs are not captured and their static
buffers run through the model eagerly, which checks everything around the replay: padding rows that must
write no KV, block tables copied into wider buffers, logits cut back to the real batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from engine.engine import Engine
from engine.request import SamplingParams


def _engine(ckpt: Any, static_decode: bool) -> Engine:
    # a small pool recycles blocks quickly: a padding row that wrote KV would corrupt a live request
    eng = Engine(EngineConfig(model=str(ckpt), dtype="float32", block_size=4, num_kv_blocks=40,
                              max_num_batched_tokens=48, prefill_chunk_size=16, max_num_seqs=8))
    if static_decode:
        r = eng.runner
        r.graphs = DecodeGraphs(r.model, 8, r.builder.max_blocks_per_seq, r.max_seq_len, r.device)
    return eng


def _run(eng: Engine) -> dict[str, list[int]]:
    """Requests of different lengths arrive while others decode, so decode batches of 1..8 sequences occur."""
    g = torch.Generator().manual_seed(3)
    plan = [(int(torch.randint(1, 40, (1,), generator=g)), 3 + 5 * (i % 4)) for i in range(11)]
    done: dict[str, list[int]] = {}
    pending = list(enumerate(plan))
    while pending or eng.has_unfinished_requests():
        if pending and (not eng.has_unfinished_requests() or len(pending) % 3 == 0 or len(done) > 2):
            i, (n_prompt, n_new) = pending.pop(0)
            prompt = torch.randint(1, 400, (n_prompt,), generator=g).tolist()
            eng.add_request(prompt, SamplingParams(max_new_tokens=n_new, ignore_eos=True), request_id=f"r{i}")
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_decode_buffers_give_the_eager_tokens(make_checkpoint: Any, family: str) -> None:
    ckpt = make_checkpoint(family)
    eager, static = _engine(ckpt, False), _engine(ckpt, True)
    want, got = _run(eager), _run(static)
    assert got == want and len(got) == 11
    graph_steps = [t for t in static.step_timings if t.cuda_graph]
    assert graph_steps and all(t.decode_only for t in graph_steps)
    sizes = {t.num_seqs for t in graph_steps}
    assert sizes - set(graph_batch_sizes(8)), f"no step needed padding: {sizes}"  # e.g. 3 sequences -> graph of 4
    assert not any(t.cuda_graph for t in eager.step_timings)
    assert any(not t.cuda_graph and not t.decode_only for t in static.step_timings)  # chunks stay eager


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_graphs_need_a_gpu(make_checkpoint: Any) -> None:
    with pytest.raises(ValueError, match="enable_cuda_graph needs a CUDA device"):
        Engine(EngineConfig(model=str(make_checkpoint("llama")), device="cpu", enable_cuda_graph=True))
