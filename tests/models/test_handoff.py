"""The engine's external-KV hooks: a prefill engine hands KV to a decode engine, in process."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def make_engine(model_dir: Any) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=128,
                               max_num_batched_tokens=16, prefill_chunk_size=8, max_num_seqs=8))


def prefill(engine: Engine, rid: str, prompt: list[int], n: int) -> tuple[list[tuple[int, Any]], int]:
    """Run tokens [0, n) on the prefill engine; collect (start, kv) per computed chunk and the first token."""
    engine.add_request(prompt[:n], SamplingParams(max_new_tokens=1, ignore_eos=True), rid, keep_kv=True)
    chunks, sent, first = [], 0, -1
    while engine.has_unfinished_requests():
        for out in engine.step():
            chunks.append((sent, engine.export_kv(rid, sent, out.num_computed_tokens)))
            sent = out.num_computed_tokens
            if out.finished:
                first = out.token_ids[0]
    assert sent == n
    return chunks, first


@pytest.mark.parametrize("num_remote", [37, 20, 1])
def test_decode_continues_from_received_kv(make_checkpoint: Any, num_remote: int) -> None:
    model_dir = make_checkpoint("llama")
    prompt = [(i * 37) % 400 + 1 for i in range(37)]
    expected = make_engine(model_dir).generate([prompt], GREEDY)[0].token_ids

    p, d = make_engine(model_dir), make_engine(model_dir)
    blocks = d.add_remote_request(prompt, GREEDY, "r1", num_remote)
    assert blocks is not None and len(blocks) == -(-num_remote // 4)
    chunks, first = prefill(p, "r1", prompt, num_remote)
    assert len(chunks) > 1 or num_remote == 1, "the prompt should have been sent chunk by chunk"
    for start, kv in chunks:
        d.import_kv("r1", start, kv)
    p.release_kv("r1")
    assert p.scheduler.block_manager.num_used_blocks == 0
    d.kv_ready("r1", num_remote, first if num_remote == len(prompt) else None)
    outputs = {}
    while d.has_unfinished_requests():
        outputs.update({o.request_id: o for o in d.step()})
    assert outputs["r1"].token_ids == expected
    assert d.scheduler.block_manager.num_used_blocks == 0


def test_failed_transfer_recomputes_with_the_same_tokens(make_checkpoint: Any) -> None:
    model_dir = make_checkpoint("llama")
    prompt = list(range(1, 30))
    expected = make_engine(model_dir).generate([prompt], GREEDY)[0].token_ids
    d = make_engine(model_dir)
    assert d.add_remote_request(prompt, GREEDY, "r1", len(prompt)) is not None
    assert not d.step(), "a request waiting for KV must not be scheduled"
    d.kv_failed("r1")
    out = [o for _ in range(50) for o in d.step() if o.finished]
    assert out[0].token_ids == expected
    assert d.scheduler.block_manager.num_used_blocks == 0


def test_abort_frees_held_and_waiting_blocks(make_checkpoint: Any) -> None:
    model_dir = make_checkpoint("llama")
    p, d = make_engine(model_dir), make_engine(model_dir)
    d.add_remote_request(list(range(1, 30)), GREEDY, "r1", 29)
    prefill(p, "r1", list(range(1, 30)), 29)
    assert p.scheduler.block_manager.num_used_blocks > 0 and d.scheduler.block_manager.num_used_blocks > 0
    assert p.abort_request("r1") and d.abort_request("r1")
    assert p.scheduler.block_manager.num_used_blocks == 0 and d.scheduler.block_manager.num_used_blocks == 0


def test_first_token_can_finish_the_request(make_checkpoint: Any) -> None:
    d = make_engine(make_checkpoint("llama"))
    d.add_remote_request([5, 6, 7], SamplingParams(max_new_tokens=1), "r1", 3)
    outs = d.kv_ready("r1", 3, 42)
    assert outs[0].finished and outs[0].token_ids == [42] and outs[0].finish_reason == "length"
    assert d.scheduler.block_manager.num_used_blocks == 0 and not d.has_unfinished_requests()
