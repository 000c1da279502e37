"""The step-input builder against a direct computation from the scheduled requests."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.request import Request, SamplingParams
from engine.scheduler import DecodeBatch, DecodeGroup, ScheduledRequest
from engine.step_inputs import InputBuilder

BS = 4
# the GPU runs the same checks through pinned staging and the device buffers the steps take turns with
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


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


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_steps_with_churn_match_direct_computation(device: str) -> None:
    """Requests come, grow, leave, come back with new blocks (preemption) and reuse ids; rows stay right."""
    rng = random.Random(0)
    builder = InputBuilder(max_num_seqs=6, max_num_tokens=64, max_blocks_per_seq=32, block_size=BS,
                           device=torch.device(device))
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


def _builder(max_num_seqs: int = 8, max_blocks_per_seq: int = 16, device: str = "cpu") -> InputBuilder:
    return InputBuilder(max_num_seqs=max_num_seqs, max_num_tokens=32, max_blocks_per_seq=max_blocks_per_seq,
                        block_size=BS, device=torch.device(device))


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


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_padded_to_a_token_size(device: str) -> None:
    """A prompt chunk continuing a cached context, padded for a prefill graph: the padding is a sequence of its own."""
    rng = random.Random(4)
    builder = _builder(device=device)
    r = _request("c", 14, 0, rng)
    r.block_ids = [7, 3, 9, 5]
    r.num_computed_tokens = 6
    scheduled = (ScheduledRequest(r, 8, 6, True),)
    for _ in range(2):  # a second build of the same shape reuses the layout's views
        got = builder.build(scheduled, pad_tokens=16)
        want = _expected(list(scheduled))
        md = got.metadata
        assert got.input_ids.tolist() == want["ids"] + [0] * 8
        assert got.positions.tolist() == want["pos"] + [0] * 8
        assert md.slot_mapping.tolist() == want["slots"] + [-1] * 8  # padding writes no KV
        assert md.seq_lens.tolist() == [14, 8]  # the padding sequence: 8 tokens, no context
        assert md.query_start_loc.tolist() == [0, 8, 16]
        assert got.logits_indices.tolist() == [7]
        assert got.num_seqs == 1 and md.block_tables.tolist() == [[7, 3, 9, 5]]
        assert got.graph_inputs is not None and got.graph_seq_meta is not None
        assert got.graph_inputs.tolist() == [got.input_ids.tolist(), got.positions.tolist(), md.slot_mapping.tolist()]
        assert got.graph_seq_meta.tolist() == [14, 8, 0, 8, 16]
    exact = builder.build(scheduled, pad_tokens=8)  # a chunk of exactly a graph's size: an empty padding sequence
    assert exact.metadata.seq_lens.tolist() == [14, 0] and exact.metadata.query_start_loc.tolist() == [0, 8, 8]
    with pytest.raises(ValueError, match="fewer than the step's 8 tokens"):
        builder.build(scheduled, pad_tokens=4)


@pytest.mark.parametrize("device", DEVICES)
def test_ahead_builds_equal_full_builds_but_for_the_token_ids(device: str) -> None:
    """Steps run ahead one after another (``build_ahead``) keep the previous build's rows and copy in only the
    rows that got blocks; each must equal a full build of the same step but for the token ids, which the device
    writes. Now and then something else is built in between, or a step is not built: the next one rebuilds."""
    rng = random.Random(3)
    fast = _builder(max_blocks_per_seq=32, device=device)
    requests, step = _decode_step("a", [3, 5, 7, 9, 11, 4], 1, 0, rng)
    next_block = 0
    for r in requests:  # distinct, unordered block ids
        r.block_ids = [next_block + 7 * i for i in range(len(r.block_ids))]
        next_block += 7 * len(r.block_ids)
    fast.build(step, pad_to=8)
    group = DecodeGroup.of(tuple(requests), max_model_len=1000)
    starts = np.array([s.start for s in step], dtype=np.int64)
    rebuilt = 0
    for k in range(1, 60):
        grown = []
        for i, r in enumerate(requests):  # what schedule_ahead does: blocks up to the token after this one
            if len(r.block_ids) * BS < starts[i] + 2:
                r.block_ids.append(next_block)
                next_block += 3
                grown.append(i)
        starts = starts + 1
        batch = DecodeBatch(group, starts, 0, k, tuple(grown))
        if rng.random() < 0.1:  # this step is not built: the next one must not trust its grown rows alone
            rebuilt += 1
        else:
            if rng.random() < 0.1:  # other requests built in between: the rows are not this batch's any more
                fast.build(_decode_step("x", [2, 6], 0, 500, rng)[1])
                rebuilt += 1
            got = fast.build_ahead(batch, pad_to=8)
            full = _builder(max_blocks_per_seq=32, device=device).build(batch.as_scheduled(), pad_to=8)
            assert got.graph_inputs is not None and full.graph_inputs is not None
            assert got.graph_inputs[0].tolist() == [0] * 8  # token ids: the device writes them
            assert got.graph_inputs[1:].tolist() == full.graph_inputs[1:].tolist(), k
            assert got.metadata.block_tables.tolist() == full.metadata.block_tables.tolist(), k
            assert got.metadata.query_start_loc.tolist() == full.metadata.query_start_loc.tolist()
            assert got.logits_indices.tolist() == full.logits_indices.tolist()
            assert got.metadata.max_seq_len == full.metadata.max_seq_len
        for r in requests:  # the step ran: its token is known
            r.output_token_ids.append(rng.randrange(1000))
            r.num_computed_tokens += 1
    assert rebuilt >= 5 and next_block > 100
