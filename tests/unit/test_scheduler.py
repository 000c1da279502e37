"""Scheduler: concrete SplitFuse scenarios (chunks, packing, decode-first, budget, FCFS, preemption, stops)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

TOKEN = 5


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 32,
    max_num_seqs: int = 8,
    prefill_chunk_size: int = 16,
    max_model_len: int = 256,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        prefill_chunk_size=prefill_chunk_size,
        max_model_len=max_model_len,
    )


def make_request(request_id: str, num_prompt_tokens: int, max_new_tokens: int = 8, **sampling: object) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)  # type: ignore[arg-type]
    return Request(request_id, list(range(1, num_prompt_tokens + 1)), params, eos_token_ids=frozenset({0}))


def step(scheduler: Scheduler, token: int = TOKEN) -> tuple[SchedulerOutput, list[Request]]:
    output = scheduler.schedule()
    tokens = [token if item.samples else None for item in output.scheduled]
    return output, scheduler.update_from_output(output, tokens)


def plan(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(item.request.request_id, item.start, item.num_new_tokens) for item in output.scheduled]


def test_long_prompt_is_split_by_chunk_size() -> None:
    scheduler = make_scheduler(prefill_chunk_size=16, max_num_batched_tokens=32)
    scheduler.add_request(make_request("a", 40))
    outputs = [step(scheduler)[0] for _ in range(3)]
    assert [plan(o) for o in outputs] == [[("a", 0, 16)], [("a", 16, 16)], [("a", 32, 8)]]
    assert [o.scheduled[0].samples for o in outputs] == [False, False, True]
    request = scheduler.get_request("a")
    assert request is not None
    assert request.num_computed_tokens == 40
    assert request.output_token_ids == [TOKEN]
    assert plan(step(scheduler)[0]) == [("a", 40, 1)]


def test_short_prompts_are_packed_in_one_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32, prefill_chunk_size=16)
    for i, n in enumerate([5, 7, 9, 20]):
        scheduler.add_request(make_request(f"r{i}", n))
    output, _ = step(scheduler)
    assert plan(output) == [("r0", 0, 5), ("r1", 0, 7), ("r2", 0, 9), ("r3", 0, 11)]
    assert output.num_batched_tokens == 32
    assert [item.samples for item in output.scheduled] == [True, True, True, False]


def test_decodes_go_first_and_share_the_step_with_chunks() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16, prefill_chunk_size=8)
    scheduler.add_request(make_request("a", 3))
    step(scheduler)
    scheduler.add_request(make_request("b", 30))
    output, _ = step(scheduler)
    assert plan(output) == [("a", 3, 1), ("b", 0, 8)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 4, 1), ("b", 8, 8)]
    scheduler.add_request(make_request("c", 10))
    output, _ = step(scheduler)
    assert plan(output) == [("a", 5, 1), ("b", 16, 8), ("c", 0, 7)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 6, 1), ("b", 24, 6), ("c", 7, 3)]
    output, _ = step(scheduler)
    assert plan(output) == [("a", 7, 1), ("b", 30, 1), ("c", 10, 1)]


def test_budget_is_never_exceeded() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10, prefill_chunk_size=64, max_num_seqs=16)
    for i in range(12):
        scheduler.add_request(make_request(f"r{i}", 3 + i, max_new_tokens=4))
    steps = 0
    while scheduler.has_unfinished_requests():
        output, _ = step(scheduler)
        assert output.num_batched_tokens <= 10
        assert output.num_batched_tokens == sum(item.num_new_tokens for item in output.scheduled)
        steps += 1
        assert steps < 200


def test_max_num_seqs_is_honoured() -> None:
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 2, max_new_tokens=3))
    output, _ = step(scheduler)
    assert plan(output) == [("r0", 0, 2), ("r1", 0, 2)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 2)
    output, _ = step(scheduler)
    assert [item.request.request_id for item in output.scheduled] == ["r0", "r1"]
    step(scheduler)  # r0 and r1 reach 3 new tokens and finish
    output, _ = step(scheduler)
    assert plan(output) == [("r2", 0, 2), ("r3", 0, 2)]


def test_waiting_queue_is_strict_fcfs() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, prefill_chunk_size=64)
    scheduler.add_request(make_request("a", 9, max_new_tokens=2))  # 3 blocks
    scheduler.add_request(make_request("big", 8, max_new_tokens=2))  # 2 blocks: does not fit
    scheduler.add_request(make_request("small", 1, max_new_tokens=2))  # 1 block: would fit
    output, _ = step(scheduler)
    assert plan(output) == [("a", 0, 9)]
    assert scheduler.num_waiting == 2
    output, finished = step(scheduler)
    assert plan(output) == [("a", 9, 1)]
    assert [r.request_id for r in finished] == ["a"]
    output, _ = step(scheduler)
    assert plan(output) == [("big", 0, 8), ("small", 0, 1)]


def test_preemption_picks_newest_and_it_is_rescheduled_first() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64, prefill_chunk_size=64)
    scheduler.add_request(make_request("a", 4, max_new_tokens=3))
    scheduler.add_request(make_request("b", 4, max_new_tokens=3))
    scheduler.add_request(make_request("c", 2, max_new_tokens=2))
    output, _ = step(scheduler)
    assert plan(output) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 2)]
    assert scheduler.block_manager.num_free_blocks == 1
    output, _ = step(scheduler)
    # a takes the last free block, b needs one more: c (newest) is preempted, not b.
    assert plan(output) == [("a", 4, 1), ("b", 4, 1)]
    assert [r.request_id for r in output.preempted] == ["c"]
    c = output.preempted[0]
    assert c.status is RequestStatus.PREEMPTED
    assert (c.num_computed_tokens, c.block_ids, c.num_preemptions) == (0, [], 1)
    assert c.output_token_ids == [TOKEN]
    scheduler.add_request(make_request("d", 1))
    output, finished = step(scheduler)
    assert plan(output) == [("a", 5, 1), ("b", 5, 1)]
    assert [r.request_id for r in finished] == ["a", "b"]
    output, _ = step(scheduler)
    # c goes ahead of d and recomputes its prompt and its output token, then samples.
    assert plan(output) == [("c", 0, 3), ("d", 0, 1)]
    assert output.scheduled[0].samples
    assert c.output_token_ids == [TOKEN, TOKEN]
    assert c.status is RequestStatus.FINISHED_LENGTH


def test_preemption_never_takes_a_request_scheduled_this_step() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=1, max_num_batched_tokens=64, prefill_chunk_size=2)
    scheduler.add_request(make_request("a", 7, max_new_tokens=1))
    step(scheduler)
    b = make_request("b", 2, max_new_tokens=4)
    scheduler.add_request(b)
    output, _ = step(scheduler)
    assert plan(output) == [("a", 2, 2), ("b", 0, 2)]
    output, _ = step(scheduler)
    # b decodes first (newest, already scheduled); a cannot grow and must not preempt b: it preempts itself.
    assert plan(output) == [("b", 2, 1)]
    assert [r.request_id for r in output.preempted] == ["a"]
    assert b.status is RequestStatus.RUNNING
    output, _ = step(scheduler)
    assert plan(output) == [("b", 3, 1), ("a", 0, 2)]


def test_abort_waiting_and_running_frees_blocks_at_once() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    manager = scheduler.block_manager
    scheduler.add_request(make_request("run", 10))
    scheduler.add_request(make_request("wait", 10))
    output = scheduler.schedule()
    assert manager.num_used_blocks == 3
    aborted = scheduler.abort_request("wait")
    assert aborted is not None and aborted.status is RequestStatus.FINISHED_ABORTED
    assert scheduler.num_waiting == 0
    aborted = scheduler.abort_request("run")
    assert aborted is not None and aborted.status is RequestStatus.FINISHED_ABORTED
    assert aborted.block_ids == []
    assert manager.num_used_blocks == 0
    assert scheduler.num_running == 0
    assert not scheduler.has_unfinished_requests()
    assert scheduler.update_from_output(output, [TOKEN]) == []
    assert aborted.output_token_ids == []
    assert scheduler.abort_request("run") is None
    assert scheduler.abort_request("nope") is None
    assert scheduler.get_request("run") is None


def test_abort_preempted_request() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64, prefill_chunk_size=64)
    for name, n in [("a", 4), ("b", 4), ("c", 2)]:
        scheduler.add_request(make_request(name, n, max_new_tokens=6))
    step(scheduler)
    output, _ = step(scheduler)
    assert [r.request_id for r in output.preempted] == ["c"]
    assert scheduler.abort_request("c") is not None
    assert scheduler.num_waiting == 0


def test_finish_request_from_the_engine() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    step(scheduler)
    request = scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert request is not None and request.status is RequestStatus.FINISHED_STOPPED
    assert scheduler.block_manager.num_used_blocks == 0
    with pytest.raises(ValueError, match="not a finished status"):
        scheduler.finish_request("a", RequestStatus.RUNNING)


def test_add_request_errors() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", 15, max_new_tokens=6))
    with pytest.raises(ValueError, match="pool has only 4"):
        scheduler.add_request(make_request("huge", 15, max_new_tokens=2))
    scheduler.add_request(make_request("ok", 12, max_new_tokens=4))
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("ok", 1))
    assert scheduler.num_waiting == 1


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_scheduler(max_num_seqs=0)


def test_update_checks_sampled_entries() -> None:
    scheduler = make_scheduler(prefill_chunk_size=2)
    scheduler.add_request(make_request("a", 3))
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled entries"):
        scheduler.update_from_output(output, [])
    with pytest.raises(ValueError, match="samples=False"):
        scheduler.update_from_output(output, [TOKEN])


def test_update_checks_the_sampled_entries_of_a_step_run_ahead() -> None:
    scheduler = make_scheduler()
    current = _decoding(scheduler, make_request("a", 3), make_request("b", 5))
    ahead = scheduler.schedule_ahead(current)
    assert ahead is not None and ahead.decode is not None
    scheduler.update_from_output(current, [TOKEN, TOKEN])
    with pytest.raises(ValueError, match="1 sampled entries for 2"):
        scheduler.update_from_output(ahead, [TOKEN])
    with pytest.raises(ValueError, match="'b': samples=True but got token None"):
        scheduler.update_from_output(ahead, [TOKEN, None])


@pytest.mark.parametrize(
    ("sampling", "eos", "tokens", "status", "reason"),
    [
        ({}, 7, [1, 7], RequestStatus.FINISHED_STOPPED, 7),
        ({"ignore_eos": True}, 7, [1, 7, 7, 2], RequestStatus.FINISHED_LENGTH, None),
        ({"stop_token_ids": [9]}, 7, [1, 9], RequestStatus.FINISHED_STOPPED, 9),
        ({"stop_token_ids": [9], "ignore_eos": True}, 7, [7, 9], RequestStatus.FINISHED_STOPPED, 9),
        ({}, 7, [1, 2, 3, 4], RequestStatus.FINISHED_LENGTH, None),
    ],
)
def test_stopping(sampling: dict, eos: int, tokens: list[int], status: RequestStatus, reason: int | None) -> None:
    scheduler = make_scheduler()
    request = Request("a", [1, 2, 3], SamplingParams(max_new_tokens=4, **sampling), eos_token_ids=frozenset({eos}))
    scheduler.add_request(request)
    finished: list[Request] = []
    for token in tokens:
        assert not finished
        _, finished = step(scheduler, token)
    assert finished == [request]
    assert request.status is status
    assert request.stop_reason == reason
    assert request.output_token_ids == tokens
    assert scheduler.block_manager.num_used_blocks == 0
    assert not scheduler.has_unfinished_requests()


def test_max_model_len_caps_output() -> None:
    scheduler = make_scheduler(max_model_len=6)
    scheduler.add_request(make_request("a", 3, max_new_tokens=3))
    for _ in range(2):
        _, finished = step(scheduler)
        assert not finished
    _, finished = step(scheduler)
    assert finished[0].status is RequestStatus.FINISHED_LENGTH
    assert finished[0].num_tokens == 6


# -- schedule_ahead (async scheduling) --------------------------------------------------------------------------------
def _decoding(scheduler: Scheduler, *requests: Request) -> SchedulerOutput:
    """Admit and prefill ``requests``; returns a decode step that has been scheduled but not updated yet."""
    for r in requests:
        scheduler.add_request(r)
    output = scheduler.schedule()
    while any(not item.samples or item.num_new_tokens != 1 for item in output.scheduled) or scheduler.num_waiting:
        scheduler.update_from_output(output, [TOKEN if item.samples else None for item in output.scheduled])
        output = scheduler.schedule()
    return output


def test_schedule_ahead_is_the_same_decode_one_token_further() -> None:
    scheduler = make_scheduler(block_size=4)
    current = _decoding(scheduler, make_request("a", 7), make_request("b", 4))
    ahead = scheduler.schedule_ahead(current)
    assert ahead is not None and ahead.ahead and ahead.num_batched_tokens == 2
    assert plan(ahead) == [(i.request.request_id, i.start + 1, 1) for i in current.scheduled]
    for item in ahead.scheduled:  # blocks already cover the token computed ahead
        assert len(item.request.block_ids) * 4 >= item.start + 1
    scheduler.update_from_output(current, [TOKEN, TOKEN])
    scheduler.update_from_output(ahead, [TOKEN, TOKEN])
    assert [r.num_computed_tokens for r in (ahead.scheduled[0].request, ahead.scheduled[1].request)] == [9, 6]
    assert all(len(i.request.output_token_ids) == 3 for i in ahead.scheduled)


@pytest.mark.parametrize("case", ["waiting", "mid-prompt", "last token", "pool full", "keep_kv"])
def test_schedule_ahead_declines_when_the_next_step_could_differ(case: str) -> None:
    scheduler = make_scheduler(num_blocks=3 if case == "pool full" else 64, block_size=4, prefill_chunk_size=4,
                               max_num_batched_tokens=8)
    first = make_request("a", 3, max_new_tokens=2 if case == "last token" else 8)
    if case == "keep_kv":
        first.keep_kv = True
    # pool full: "a" decodes position 3 (its block 0), "b" position 7 (its block 1); the step after needs a
    # block for position 4 of "a", and all 3 are taken
    current = _decoding(scheduler, first, *([make_request("b", 7, max_new_tokens=3)] if case == "pool full" else []))
    assert [i.num_new_tokens for i in current.scheduled] == [1] * len(current.scheduled)
    if case == "waiting":
        scheduler.add_request(make_request("w", 3))
    if case == "mid-prompt":  # a long prompt joins, partly computed: the next step holds its next chunk
        scheduler.update_from_output(current, [TOKEN])
        scheduler.add_request(make_request("long", 30))
        current = scheduler.schedule()
        assert any(not item.samples for item in current.scheduled)
    free_before = scheduler.block_manager.num_free_blocks
    assert scheduler.schedule_ahead(current) is None
    assert scheduler.block_manager.num_free_blocks == free_before
