"""Async scheduling: the next decode step is queued before the current step's tokens are read.

Everything a caller sees must be what the synchronous engine gives: the same tokens, one output per token,
nothing after a stop or an abort, every block free at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.outputs import RequestOutput
from engine.request import SamplingParams


@pytest.fixture(scope="module")
def llama(make_checkpoint: Any) -> Path:
    return make_checkpoint("llama")


def _engine(model_dir: Path, async_scheduling: bool, detokenize: bool = True) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=96,
                               max_num_batched_tokens=32, prefill_chunk_size=16, max_num_seqs=6,
                               async_scheduling=async_scheduling), detokenize=detokenize)


def _fields(out: RequestOutput) -> tuple:
    return (out.request_id, out.prompt_token_ids, out.new_token_ids, out.text, out.new_text, out.finished,
            out.finish_reason, out.num_preemptions, out.num_computed_tokens, out.num_output_tokens, out.token_ids)


def _drive(eng: Engine, stop_token: int) -> tuple[dict[str, list[int]], dict[str, list[RequestOutput]]]:
    """Arrivals mid-decode, greedy and seeded sampling, a stop token, a stop string, an abort."""
    g = torch.Generator().manual_seed(11)
    params = [
        SamplingParams(max_new_tokens=14, ignore_eos=True),
        SamplingParams(max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True),
        SamplingParams(max_new_tokens=30, stop_token_ids=(stop_token,), ignore_eos=True),
        SamplingParams(max_new_tokens=25, stop=(" ",), ignore_eos=True),
        SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=1, ignore_eos=True),
        SamplingParams(max_new_tokens=40, ignore_eos=True),  # aborted midway
        SamplingParams(max_new_tokens=12, ignore_eos=True),
    ]
    streams: dict[str, list[RequestOutput]] = {}
    step = 0
    while params or eng.has_unfinished_requests():
        if params and step % 4 == 0:
            rid = f"r{7 - len(params)}"
            eng.add_request(torch.randint(1, 400, (3 + 5 * len(params),), generator=g).tolist(), params.pop(0),
                            request_id=rid)
            streams[rid] = []
        if step == 24:  # r5 arrived at step 20
            assert eng.abort_request("r5")
        for out in eng.step():
            streams[out.request_id].append(out)
        step += 1
    return {rid: (outs[-1].token_ids if outs else []) for rid, outs in streams.items()}, streams


@pytest.mark.parametrize("detokenize", [True, False], ids=["text", "workers"])
def test_async_scheduling_changes_nothing_a_caller_sees(llama: Path, detokenize: bool) -> None:
    """``detokenize=False`` (workers): only the stop-string request has text, the others take the steady
    decode path's outputs, which must hold what the synchronous engine's do, field for field."""
    sync_eng = _engine(llama, False, detokenize)
    unstopped, _ = _drive(sync_eng, stop_token=-1)
    r2 = unstopped["r2"]
    stop_token = next(t for i, t in enumerate(r2) if i > 4 and t not in r2[:i])  # stops r2 at its i-th token

    want, want_streams = _drive(_engine(llama, False, detokenize), stop_token)
    assert len(want["r2"]) < len(r2)
    eng = _engine(llama, True, detokenize)
    got, streams = _drive(eng, stop_token)
    # a request that arrives while a step runs ahead starts one step later, so the abort of r5 (at a fixed
    # step) may find fewer of its tokens; the ones it has are the same
    aborted, aborted_want = got.pop("r5"), want.pop("r5")
    assert 0 < len(aborted) <= len(aborted_want) and aborted == aborted_want[: len(aborted)]
    assert got == want
    for rid, outs in streams.items():
        if rid != "r5":
            assert [_fields(o) for o in outs] == [_fields(o) for o in want_streams[rid]], rid
        assert sum(o.finished for o in outs) == (rid != "r5") and (not outs or outs[-1].finished or rid == "r5")
    assert any(t.ahead for t in eng.step_timings), "no step was run ahead"
    assert not any(t.ahead for t in sync_eng.step_timings)
    assert eng.scheduler.block_manager.num_used_blocks == 0


def test_request_ending_by_stop_token_while_the_next_step_runs(llama: Path) -> None:
    """The step queued ahead computes the stopped request once more; that token is dropped."""
    eng = _engine(llama, True)
    full = eng.generate([[9, 8, 7, 6, 5]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids
    stop_at = next(i for i in range(2, 16) if full[i] not in full[:i])
    out = eng.generate([[9, 8, 7, 6, 5]], SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                         stop_token_ids=(full[stop_at],)))[0]
    assert out.token_ids == full[: stop_at + 1] and out.finish_reason == "stop"
    assert any(t.ahead for t in eng.step_timings)
    assert eng.generate([[9, 8, 7, 6, 5]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0].token_ids == full
    assert eng.scheduler.block_manager.num_used_blocks == 0


@pytest.mark.gpu
def test_reading_a_steps_tokens_leaves_the_work_queued_after_it_running() -> None:
    """TokenReadback.read() waits for its own step only: a step queued ahead keeps the GPU busy meanwhile."""
    from engine.model_runner import TokenReadback

    readback = TokenReadback(8, torch.device("cuda"))
    host = readback.start(torch.arange(5, device="cuda"))
    assert host.buffer.is_pinned()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued behind the step (a step run ahead)
    assert readback.read(host) == [0, 1, 2, 3, 4]
    assert not torch.cuda.current_stream().query(), "read() synchronised the whole stream"
    torch.cuda.synchronize()
