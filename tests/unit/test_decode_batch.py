"""The decode batch (async scheduling's steady path) against the per-request rules it stands for.

Two identical schedulers are driven like the async engine drives one (each step queued ahead of the previous
one's tokens): one with ``schedule_ahead`` and the decode batch's vectorised update and stop check, the other
with the per-request rule ``schedule_ahead`` had before there were decode batches and the per-request update
(the same steps without their batch form). Random prompts, limits, stop tokens, EOS, arrivals, aborts and a
tight KV pool; the two must agree on every decision and every request's state after every step.
"""

from __future__ import annotations

import random
import zlib

import numpy as np

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import DecodeBatch, DecodeGroup, ScheduledRequest, Scheduler, SchedulerOutput

VOCAB = 12  # small: stop tokens and EOS come up often


def reference_schedule_ahead(scheduler: Scheduler, previous: SchedulerOutput) -> SchedulerOutput | None:
    """``Scheduler.schedule_ahead`` as one pass over the requests (its rule before decode batches)."""
    if not previous.scheduled or scheduler.num_waiting or previous.preempted or \
            len(previous.scheduled) != scheduler.num_running:
        return None
    block_size = scheduler.block_manager.block_size
    scheduled = []
    for item in previous.scheduled:
        request = item.request
        if item.num_new_tokens != 1 or not item.samples or request.status is not RequestStatus.RUNNING \
                or request.keep_kv:
            return None
        num_output = len(request.output_token_ids) + 1
        if num_output >= request.sampling.max_new_tokens or \
                len(request.prompt_token_ids) + num_output >= scheduler.max_model_len:
            return None
        if item.start + 2 > len(request.block_ids) * block_size and \
                not scheduler.block_manager.allocate_slots(request, 2):
            return None
        scheduled.append(ScheduledRequest(request, 1, item.start + 1, True))
    return SchedulerOutput(tuple(scheduled), (), len(scheduled), ahead=True)


def token(request: Request, position: int) -> int:
    return zlib.crc32(f"{request.request_id}:{position}".encode()) % VOCAB


class World:
    """A scheduler with its requests and a random script of arrivals and aborts (the same for a seed)."""

    def __init__(self, seed: int, batched: bool) -> None:
        rng = random.Random(seed)
        self.batched = batched
        block_size = rng.choice([1, 2, 4, 16])
        self.max_model_len = rng.randrange(16, 64)
        specs = [self._spec(rng, i) for i in range(rng.randrange(1, 20))]
        largest = max(len(prompt) + sp.max_new_tokens for _, prompt, sp, _ in specs)
        num_blocks = -(-largest // block_size) + rng.randrange(0, 3 * len(specs))  # often too few for all
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), max_num_batched_tokens=rng.randrange(8, 128),
                                   max_num_seqs=rng.randrange(1, 20), prefill_chunk_size=rng.randrange(1, 64),
                                   max_model_len=self.max_model_len)
        self.requests = [Request(rid, prompt, sp, eos_token_ids=eos) for rid, prompt, sp, eos in specs]
        self.arrivals = {r.request_id: rng.choice([0, 0, rng.randrange(0, 40)]) for r in self.requests}
        self.aborts = {rng.randrange(0, 60): rng.choice(self.requests).request_id for _ in range(rng.randrange(3))}

    def _spec(self, rng: random.Random, i: int) -> tuple[str, list[int], SamplingParams, frozenset[int]]:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
        sampling = SamplingParams(max_new_tokens=rng.randrange(1, self.max_model_len - len(prompt) + 1),
                                  ignore_eos=rng.random() < 0.3,
                                  stop_token_ids=tuple(rng.sample(range(1, VOCAB), rng.randrange(0, 2))))
        eos = frozenset(rng.sample(range(VOCAB), rng.randrange(0, 3)))
        return f"r{i}", prompt, sampling, eos

    def before_step(self, step: int) -> None:
        for request in self.requests:
            if self.arrivals[request.request_id] == step:
                self.scheduler.add_request(request)
        if step in self.aborts:
            self.scheduler.abort_request(self.aborts[step])

    def ahead(self, current: SchedulerOutput) -> SchedulerOutput | None:
        if self.batched:
            return self.scheduler.schedule_ahead(current)
        return reference_schedule_ahead(self.scheduler, current)

    def update(self, output: SchedulerOutput) -> list[str]:
        """The step's tokens (a function of request and position), through the decode batch if it has one."""
        tokens = [token(s.request, s.end) if s.samples else None for s in output.scheduled]
        if not self.batched and output.decode is not None:  # the same step, without its batch form
            output = SchedulerOutput(output.scheduled, output.preempted, output.num_batched_tokens, output.ahead)
        return [r.request_id for r in self.scheduler.update_from_output(output, tokens)]

    def state(self) -> list[tuple]:
        manager = self.scheduler.block_manager
        return [(manager.num_free_blocks, self.scheduler.num_running, self.scheduler.num_waiting)] + [
            (r.status, r.stop_reason, r.num_computed_tokens, r.output_token_ids, r.block_ids) for r in self.requests]


def plan(output: SchedulerOutput | None) -> list[tuple[str, int, int, bool]] | None:
    if output is None:
        return None
    return [(s.request.request_id, s.start, s.num_new_tokens, s.samples) for s in output.scheduled]


def test_decode_batches_decide_what_the_per_request_rules_decide() -> None:
    ran_ahead = stopped_in_batch = 0
    for seed in range(300):
        worlds = World(seed, batched=True), World(seed, batched=False)
        in_flight: list[SchedulerOutput | None] = [None, None]
        for step in range(400):
            for world in worlds:
                world.before_step(step)
            if step > max(worlds[0].arrivals.values()) and not worlds[0].scheduler.has_unfinished_requests():
                break
            currents = [flight or world.scheduler.schedule() for flight, world in zip(in_flight, worlds, strict=True)]
            in_flight = [world.ahead(current) for world, current in zip(worlds, currents, strict=True)]
            assert plan(in_flight[0]) == plan(in_flight[1]), (seed, step)
            assert worlds[0].state() == worlds[1].state(), (seed, step)  # the blocks allocated ahead, too
            finished = [world.update(current) for world, current in zip(worlds, currents, strict=True)]
            assert finished[0] == finished[1], (seed, step)
            assert worlds[0].state() == worlds[1].state(), (seed, step)
            ran_ahead += in_flight[0] is not None
            stopped_in_batch += bool(finished[0]) and currents[0].decode is not None
        assert all(r.is_finished for r in worlds[0].requests), seed
        assert worlds[0].scheduler.block_manager.num_used_blocks == 0, seed
    assert ran_ahead > 1000 and stopped_in_batch > 100, (ran_ahead, stopped_in_batch)


def test_may_stop_flags_every_row_that_stops() -> None:
    """On random batches: every row whose token stops its request (stop token, EOS, length) is flagged."""
    rng = random.Random(0)
    for _ in range(500):
        max_model_len = rng.randrange(4, 40)
        requests, starts = [], []
        for i in range(rng.randrange(1, 30)):
            prompt_len = rng.randrange(1, max_model_len)
            sampling = SamplingParams(max_new_tokens=rng.randrange(1, max_model_len - prompt_len + 1),
                                      ignore_eos=rng.random() < 0.5, stop_token_ids=(rng.randrange(VOCAB),))
            request = Request(f"r{i}", [1] * prompt_len, sampling, eos_token_ids=frozenset({rng.randrange(VOCAB)}))
            num_output = rng.randrange(0, min(sampling.max_new_tokens, max_model_len - prompt_len))
            request.output_token_ids = [1] * num_output  # the step's token makes num_output + 1
            requests.append(request)
            starts.append(prompt_len + num_output - 1)
        batch = DecodeBatch(DecodeGroup.of(tuple(requests), max_model_len), np.array(starts, dtype=np.int64), 0)
        sampled = [rng.randrange(VOCAB) for _ in requests]
        scheduler = Scheduler(BlockManager(1, 1), max_num_batched_tokens=1, max_num_seqs=1, prefill_chunk_size=1,
                              max_model_len=max_model_len)
        stopping = []
        for i, (request, t) in enumerate(zip(requests, sampled, strict=True)):
            request.output_token_ids.append(t)
            if scheduler._check_stop(request, t) is not None:
                stopping.append(i)
        flagged = batch.may_stop(sampled)
        assert flagged == sorted(set(flagged)) and set(stopping) <= set(flagged)
