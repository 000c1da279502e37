"""Scheduler + BlockManager under random workloads, driven by a fake deterministic model over a fake KV cache.

The fake model writes each computed token into its cache slot and, when a request samples, reads
the request's whole history back through its block table; the next token is a pure function of
that history. Corrupt block tables, lost KV or a wrong recompute therefore change the output,
which must equal what the request produces alone in a big pool.
"""

from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput

VOCAB = 50
EOS = 0
MAX_MODEL_LEN = 100
STATS = {"examples": 0, "preempting": 0}


def next_token(tokens: list[int]) -> int:
    return zlib.crc32(array("i", tokens).tobytes()) % VOCAB


class FakeModel:
    """A KV cache of (request_id, position, token) per slot; samples from what it reads back."""

    def __init__(self, manager: BlockManager) -> None:
        self.manager = manager
        self.cache: list[tuple[str, int, int] | None] = [None] * (manager.num_blocks * manager.block_size)

    def run(self, output: SchedulerOutput) -> list[int | None]:
        sampled: list[int | None] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # ended after a step queued ahead took it: its token is dropped
                sampled.append(0 if item.samples else None)
                continue
            for position in range(item.start, item.end):
                token = request.token_ids[position]
                self.cache[self.manager.slot(request, position)] = (request.request_id, position, token)
            sampled.append(self._sample(request, item.end) if item.samples else None)
        return sampled

    def _sample(self, request: Request, end: int) -> int:
        history = []
        for position in range(end):
            entry = self.cache[self.manager.slot(request, position)]
            assert entry is not None and entry[:2] == (request.request_id, position), (request, position, entry)
            history.append(entry[2])
        assert history == request.token_ids[:end]
        return next_token(history)


@dataclass(frozen=True)
class Spec:
    prompt: tuple[int, ...]
    max_new_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    arrival: int
    abort_at: int | None
    abort_mid_step: bool

    def make(self, request_id: str) -> Request:
        sampling = SamplingParams(
            max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids
        )
        return Request(request_id, list(self.prompt), sampling, eos_token_ids=frozenset({EOS}))


@dataclass(frozen=True)
class Workload:
    specs: tuple[Spec, ...]
    block_size: int
    extra_blocks: int
    max_num_batched_tokens: int
    prefill_chunk_size: int
    max_num_seqs: int

    def num_blocks(self) -> int:
        largest = max(len(s.prompt) + s.max_new_tokens for s in self.specs)
        return -(-largest // self.block_size) + self.extra_blocks


specs = st.builds(
    Spec,
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60).map(tuple),
    max_new_tokens=st.integers(1, 20),
    ignore_eos=st.booleans(),
    stop_token_ids=st.lists(st.integers(1, VOCAB - 1), max_size=2).map(tuple),
    arrival=st.integers(0, 20),
    abort_at=st.none() | st.none() | st.integers(0, 40),
    abort_mid_step=st.booleans(),
)
workloads = st.builds(
    Workload,
    specs=st.lists(specs, min_size=1, max_size=8).map(tuple),
    block_size=st.sampled_from([1, 2, 4, 16]),
    extra_blocks=st.integers(0, 2),
    max_num_batched_tokens=st.integers(1, 64),
    prefill_chunk_size=st.integers(1, 64),
    max_num_seqs=st.integers(1, 8),
)


def make_scheduler(workload: Workload, num_blocks: int) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, workload.block_size),
        max_num_batched_tokens=workload.max_num_batched_tokens,
        max_num_seqs=workload.max_num_seqs,
        prefill_chunk_size=workload.prefill_chunk_size,
        max_model_len=MAX_MODEL_LEN,
    )


def run_alone(spec: Spec, block_size: int) -> Request:
    manager = BlockManager(-(-MAX_MODEL_LEN // block_size), block_size)
    scheduler = Scheduler(
        manager, max_num_batched_tokens=256, max_num_seqs=1, prefill_chunk_size=256, max_model_len=MAX_MODEL_LEN
    )
    model = FakeModel(manager)
    request = spec.make("alone")
    scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        scheduler.update_from_output(output, model.run(output))
    return request


def check_output(scheduler: Scheduler, output: SchedulerOutput) -> None:
    assert not output.is_empty, "a step with unfinished requests must make progress"
    assert output.num_batched_tokens == sum(item.num_new_tokens for item in output.scheduled)
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    ids = [item.request.request_id for item in output.scheduled]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    assert not {r.request_id for r in output.preempted} & set(ids), "a scheduled request was preempted"
    for item in output.scheduled:
        request = item.request
        assert item.num_new_tokens >= 1
        assert item.start == request.num_computed_tokens
        assert item.end <= request.num_tokens
        assert item.samples == (item.end == request.num_tokens)
        assert len(request.block_ids) * scheduler.block_manager.block_size >= item.end
        assert request.status is RequestStatus.RUNNING
    for request in output.preempted:
        assert request.status is RequestStatus.PREEMPTED and not request.block_ids


def check_state(scheduler: Scheduler, requests: list[Request]) -> None:
    manager = scheduler.block_manager
    live = [r for r in requests if not r.is_finished]
    assert scheduler.num_running <= scheduler.max_num_seqs
    assert scheduler.num_running == sum(r.status is RequestStatus.RUNNING for r in live)
    assert scheduler.num_waiting == len(live) - scheduler.num_running
    held = [b for r in live for b in r.block_ids]
    assert len(held) == len(set(held)), "a block is held by two live requests"
    assert manager.num_used_blocks == len(held)
    for request in requests:
        if request.is_finished or request.status is not RequestStatus.RUNNING:
            assert not request.block_ids and (request.is_finished or request.num_computed_tokens == 0)
        else:
            assert len(request.block_ids) == manager.blocks_needed(request.num_computed_tokens)


def arrive(workload: Workload, scheduler: Scheduler, requests: list[Request], step: int) -> list[Request]:
    """Add the requests that arrive at ``step`` and abort those aborted before it; returns the arrivals."""
    arrived = [r for spec, r in zip(workload.specs, requests, strict=True) if spec.arrival == step]
    for request in arrived:
        scheduler.add_request(request)
    abort(workload, scheduler, requests, step, mid_step=False)
    return arrived


def abort(workload: Workload, scheduler: Scheduler, requests: list[Request], step: int, mid_step: bool) -> None:
    for spec, request in zip(workload.specs, requests, strict=True):
        if spec.abort_at == step and spec.abort_mid_step == mid_step:
            scheduler.abort_request(request.request_id)


def run_workload(workload: Workload) -> tuple[Scheduler, list[Request]]:
    """Run the workload to the end (within a bound of steps), checking invariants at every step."""
    scheduler = make_scheduler(workload, workload.num_blocks())
    model = FakeModel(scheduler.block_manager)
    requests = [spec.make(f"r{i}") for i, spec in enumerate(workload.specs)]
    added: list[Request] = []
    last_arrival = max(spec.arrival for spec in workload.specs)
    max_steps = last_arrival + 10 * sum(len(s.prompt) + s.max_new_tokens for s in workload.specs)
    step = 0
    while step <= last_arrival or scheduler.has_unfinished_requests():
        assert step < max_steps, "the scheduler does not terminate"
        added += arrive(workload, scheduler, requests, step)
        if scheduler.has_unfinished_requests():
            output = scheduler.schedule()
            check_output(scheduler, output)
            sampled = model.run(output)
            abort(workload, scheduler, requests, step, mid_step=True)
            finished = scheduler.update_from_output(output, sampled)
            assert all(r.is_finished and not r.block_ids for r in finished)
            check_state(scheduler, added)
        step += 1
    return scheduler, requests


def run_workload_ahead(workload: Workload) -> tuple[Scheduler, list[Request]]:
    """``run_workload`` as the async engine drives the scheduler: while a decode step runs, the next one is
    queued (``schedule_ahead``); the fake model runs a step after the step before it was applied, as the
    device does, and a request that ended meanwhile is skipped."""
    scheduler = make_scheduler(workload, workload.num_blocks())
    model = FakeModel(scheduler.block_manager)
    requests = [spec.make(f"r{i}") for i, spec in enumerate(workload.specs)]
    last_arrival = max(spec.arrival for spec in workload.specs)
    max_steps = last_arrival + 10 * sum(len(s.prompt) + s.max_new_tokens for s in workload.specs)
    in_flight: SchedulerOutput | None = None
    step = ran_ahead = 0
    while step <= last_arrival or scheduler.has_unfinished_requests():
        assert step < max_steps, "the scheduler does not terminate"
        arrive(workload, scheduler, requests, step)
        if in_flight is not None or scheduler.has_schedulable_requests():
            output = in_flight or scheduler.schedule()
            in_flight = scheduler.schedule_ahead(output)
            ran_ahead += in_flight is not None
            sampled = model.run(output)
            abort(workload, scheduler, requests, step, mid_step=True)
            finished = scheduler.update_from_output(output, sampled)
            assert all(r.is_finished and not r.block_ids for r in finished)
            held = [b for r in requests if not r.is_finished for b in r.block_ids]
            assert len(held) == len(set(held)) == scheduler.block_manager.num_used_blocks
        step += 1
    event(f"steps run ahead: {bool(ran_ahead)}")
    return scheduler, requests


def check_final(workload: Workload, scheduler: Scheduler, requests: list[Request]) -> None:
    manager = scheduler.block_manager
    assert all(r.is_finished and not r.block_ids for r in requests)
    assert manager.num_free_blocks == manager.num_blocks
    assert (scheduler.num_waiting, scheduler.num_running) == (0, 0)
    assert all(scheduler.get_request(r.request_id) is None for r in requests)
    for spec, request in zip(workload.specs, requests, strict=True):
        alone = run_alone(spec, workload.block_size)
        if request.status is RequestStatus.FINISHED_ABORTED:
            assert request.output_token_ids == alone.output_token_ids[: request.num_output_tokens]
        else:
            assert request.output_token_ids == alone.output_token_ids
            assert (request.status, request.stop_reason) == (alone.status, alone.stop_reason)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads(workload: Workload) -> None:
    scheduler, requests = run_workload(workload)
    check_final(workload, scheduler, requests)
    preempted = any(r.num_preemptions for r in requests)
    event(f"preempted: {preempted}")
    STATS["examples"] += 1
    STATS["preempting"] += preempted


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads)
def test_random_workloads_with_steps_run_ahead(workload: Workload) -> None:
    scheduler, requests = run_workload_ahead(workload)
    check_final(workload, scheduler, requests)


def test_some_random_workloads_preempted() -> None:
    if STATS["examples"] == 0:
        test_random_workloads()
    assert STATS["preempting"] > 0, STATS


def test_explicit_workload_preempts_and_keeps_output() -> None:
    spec = Spec(tuple(range(1, 30)), 20, True, (), 0, None, False)
    workload = Workload((spec, spec, spec, spec), 4, 0, 64, 16, 4)
    scheduler, requests = run_workload(workload)
    check_final(workload, scheduler, requests)
    assert sum(r.num_preemptions for r in requests) > 0
    assert all(r.num_output_tokens == 20 for r in requests)
