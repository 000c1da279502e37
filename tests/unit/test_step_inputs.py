"""The step-input builder against a direct computation from the scheduled requests."""

from __future__ import annotations

import random

import pytest
import torch

from engine.request import Request, SamplingParams
from engine.scheduler import ScheduledRequest
from engine.step_inputs import InputBuilder

BS = 4


def _request(rid: str, prompt_len: int, outputs: int, rng: random.Random) -> Request:
    r = Request(rid, [rng.randrange(1000) for _ in range(prompt_len)], SamplingParams(max_new_tokens=64))
    r.output_token_ids = [rng.randrange(1000) for _ in range(outputs)]
    return r


def _expected(scheduled: list[ScheduledRequest]) -> dict[str, list]:
    ids, pos, slots, qsl, lens, sample_rows = [], [], [], [0], [], []
    for s in scheduled:
        for p in range(s.start, s.end):
            ids.append(s.request.token_ids[p])
            pos.append(p)
            slots.append(s.request.block_ids[p // BS] * BS + p % BS)
        qsl.append(qsl[-1] + s.num_new_tokens)
        lens.append(s.end)
        if s.samples:
            sample_rows.append(qsl[-1] - 1)
    return dict(ids=ids, pos=pos, slots=slots, qsl=qsl, lens=lens, rows=sample_rows)


def _check(builder: InputBuilder, scheduled: list[ScheduledRequest]) -> None:
    got = builder.build(tuple(scheduled))
    want = _expected(scheduled)
    md = got.metadata
    assert got.input_ids.tolist() == want["ids"]
    assert got.positions.tolist() == want["pos"]
    assert md.slot_mapping.tolist() == want["slots"]
    assert md.query_start_loc.tolist() == want["qsl"]
    assert md.seq_lens.tolist() == want["lens"]
    assert got.logits_indices.tolist() == want["rows"]
    assert md.max_query_len == max(s.num_new_tokens for s in scheduled)
    assert md.max_seq_len == max(want["lens"])
    for row, s in zip(md.block_tables.tolist(), scheduled, strict=True):
        own = len(s.request.block_ids)
        assert row[:own] == s.request.block_ids
        assert all(b == 0 for b in row[own:])  # padding past a request's blocks is zero, never a stale id


def test_mixed_steps_with_churn_match_direct_computation() -> None:
    """Requests come, grow, leave, come back with new blocks (preemption) and reuse ids; rows stay right."""
    rng = random.Random(0)
    builder = InputBuilder(max_num_seqs=6, max_num_tokens=64, max_blocks_per_seq=32, block_size=BS,
                           device=torch.device("cpu"))
    free = list(range(200))
    rng.shuffle(free)
    live: list[Request] = []
    for step in range(60):
        if len(live) < 6 and rng.random() < 0.5:
            live.append(_request(f"r{step % 7}", rng.randrange(1, 40), 0, rng))  # ids repeat across requests
        if live and rng.random() < 0.15:  # preempted or finished: blocks go back, the request may return later
            gone = live.pop(rng.randrange(len(live)))
            free.extend(gone.block_ids)
            gone.block_ids = []
            gone.num_computed_tokens = 0
            if rng.random() < 0.5:
                live.append(gone)
        if not live:
            continue
        scheduled = []
        for r in rng.sample(live, rng.randrange(1, len(live) + 1)):
            left = r.num_tokens - r.num_computed_tokens
            n = left if left <= 1 else rng.randrange(1, min(left, 12) + 1)
            while len(r.block_ids) * BS < r.num_computed_tokens + n:
                r.block_ids.append(free.pop())
            scheduled.append(ScheduledRequest(r, n, r.num_computed_tokens, r.num_computed_tokens + n == r.num_tokens))
        _check(builder, scheduled)
        for s in scheduled:  # the step ran: tokens computed, samplers append a token
            s.request.num_computed_tokens = s.end
            if s.samples:
                s.request.output_token_ids.append(rng.randrange(1000))


def _builder(max_num_seqs: int = 8, max_blocks_per_seq: int = 16) -> InputBuilder:
    return InputBuilder(max_num_seqs=max_num_seqs, max_num_tokens=32, max_blocks_per_seq=max_blocks_per_seq,
                        block_size=BS, device=torch.device("cpu"))


def _decode_step(prefix: str, prompt_lens: list[int], outputs: int, block_stride: int,
                 rng: random.Random) -> tuple[list[Request], tuple[ScheduledRequest, ...]]:
    """Requests with one token left each (blocks block_stride * i onwards), and their decode step."""
    requests = [_request(f"{prefix}{i}", n, outputs, rng) for i, n in enumerate(prompt_lens)]
    for i, r in enumerate(requests):
        r.num_computed_tokens = r.num_tokens - 1
        r.block_ids = list(range(block_stride * i, block_stride * i + -(-r.num_tokens // BS)))
    return requests, tuple(ScheduledRequest(r, 1, r.num_computed_tokens, True) for r in requests)


def test_decode_step_padded_to_a_graph_size() -> None:
    builder = _builder()
    _, scheduled = _decode_step("d", [5, 8, 11], 2, 10, random.Random(1))
    got = builder.build(scheduled, pad_to=8)
    want = _expected(list(scheduled))
    md = got.metadata
    assert got.input_ids.tolist() == want["ids"] + [0] * 5
    assert got.positions.tolist() == want["pos"] + [0] * 5
    assert md.slot_mapping.tolist() == want["slots"] + [-1] * 5  # padding writes no KV
    assert md.seq_lens.tolist() == want["lens"] + [1] * 5
    assert md.query_start_loc.tolist() == list(range(9))
    assert got.num_seqs == 3 and md.block_tables.shape[0] == 3
    assert got.graph_inputs is not None
    assert got.graph_inputs.tolist() == [got.input_ids.tolist(), got.positions.tolist(),
                                         md.slot_mapping.tolist(), md.seq_lens.tolist()]


def test_padding_refuses_prompt_chunks() -> None:
    rng = random.Random(2)
    builder = _builder(max_num_seqs=4, max_blocks_per_seq=8)
    r = _request("p", 6, 0, rng)
    r.block_ids = [0, 1]
    with pytest.raises(ValueError, match="decode-only"):
        builder.build((ScheduledRequest(r, 6, 0, True),), pad_to=4)


def test_ahead_build_equals_a_full_build_but_for_the_token_ids() -> None:
    """A step run ahead updates the previous build's rows (new blocks, positions + 1); tokens come later."""
    fast = _builder()
    requests, step = _decode_step("a", [3, 5, 7, 9, 11], 1, 12, random.Random(3))
    fast.build(step, pad_to=8)
    for r in requests:  # what schedule_ahead does: blocks for one more token; the token itself is unknown
        while len(r.block_ids) * BS < r.num_computed_tokens + 2:
            r.block_ids.append(max(r.block_ids) + 1)
    ahead = tuple(ScheduledRequest(s.request, 1, s.start + 1, True) for s in step)
    got = fast.build(ahead, pad_to=8, ahead=True)
    for r in requests:
        r.output_token_ids.append(0)  # the placeholder the ahead build writes
    full = _builder().build(ahead, pad_to=8)
    assert got.graph_inputs is not None and full.graph_inputs is not None
    assert got.graph_inputs.tolist() == full.graph_inputs.tolist()
    assert got.metadata.block_tables.tolist() == full.metadata.block_tables.tolist()
    assert got.metadata.query_start_loc.tolist() == full.metadata.query_start_loc.tolist()
    assert got.metadata.max_seq_len == full.metadata.max_seq_len
