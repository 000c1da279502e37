"""Token-budget Dynamic SplitFuse scheduling: which requests compute which tokens this step (no torch)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """This step computes tokens ``[start, start + num_new_tokens)`` of ``request.token_ids``.

    ``start`` is ``request.num_computed_tokens`` at schedule time; ``request.block_ids`` already
    cover ``end``. ``samples`` is True when ``end`` reached ``request.num_tokens`` at schedule
    time: the logit of the step's last token of this request is sampled into a new token.
    """

    request: Request
    num_new_tokens: int
    start: int
    samples: bool

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(frozen=True, eq=False)
class DecodeGroup:
    """Requests that decode together while the running set stays the same (async scheduling runs their
    steps ahead one after another), with what stays fixed meanwhile as arrays: a step of theirs is then
    advanced and stop-checked without a Python loop over the requests."""

    requests: tuple[Request, ...]
    stop_at: np.ndarray  # int64: the token count at which each request ends by length
    stop_tokens: frozenset[int]  # tokens that stop at least one of them (EOS unless ignore_eos, stop_token_ids)

    @classmethod
    def of(cls, requests: tuple[Request, ...], max_model_len: int) -> DecodeGroup:
        stop_at = np.array([min(len(r.prompt_token_ids) + r.sampling.max_new_tokens, max_model_len)
                            for r in requests], dtype=np.int64)
        stop_tokens: set[int] = set()
        for r in requests:
            if not r.sampling.ignore_eos:
                stop_tokens |= r.eos_token_ids
            stop_tokens.update(r.sampling.stop_token_ids)
        return cls(requests, stop_at, frozenset(stop_tokens))

    @cached_property
    def all_greedy(self) -> bool:
        return all(r.sampling.greedy for r in self.requests)


@dataclass(frozen=True, eq=False)
class DecodeBatch:
    """A decode step in batch form: ``group.requests[i]`` computes one token at position ``starts[i]`` and
    samples. ``step`` counts the group's batches; ``grown`` are the rows whose requests got blocks since
    the group's batch before (for the step-input builder, which copies only those into its tables)."""

    group: DecodeGroup
    starts: np.ndarray  # int64
    running_version: int  # the scheduler's running-set version when this was scheduled
    step: int = 0
    grown: tuple[int, ...] = ()

    @property
    def requests(self) -> tuple[Request, ...]:
        return self.group.requests

    def as_scheduled(self) -> tuple[ScheduledRequest, ...]:
        return tuple(ScheduledRequest(r, 1, start, True) for r, start in zip(self.requests, self.starts.tolist(),
                                                                               strict=True))

    @cached_property
    def ending_rows(self) -> list[int]:
        """Rows whose request reaches its length limit with this step's token (it then holds ``start + 2``
        tokens); both ``schedule_ahead`` and ``update_from_output`` ask."""
        return np.flatnonzero(self.starts + 2 >= self.group.stop_at).tolist()

    def may_stop(self, sampled: Sequence[int]) -> list[int]:
        """Rows whose new token may end their request (a superset; each is checked exactly): a stop token of
        one of the requests, or the length limit."""
        rows = self.ending_rows
        stop_tokens = self.group.stop_tokens
        if not stop_tokens.isdisjoint(sampled):  # rare: one C-level pass in the common case
            rows = sorted(set(rows).union(i for i, t in enumerate(sampled) if t in stop_tokens))
        return rows


class SchedulerOutput:
    """One step's work: decodes first, then prompt/recompute chunks, each request at most once.

    ``preempted`` requests lost their blocks this step and went back to the front of the waiting
    queue; they will recompute all their tokens (prompt and outputs so far). A step scheduled ahead
    comes as ``decode`` (its batch form), and ``scheduled`` is made from it only when asked for.
    """

    def __init__(self, scheduled: tuple[ScheduledRequest, ...] | None, preempted: tuple[Request, ...],
                 num_batched_tokens: int, ahead: bool = False, decode: DecodeBatch | None = None) -> None:
        if scheduled is None and decode is None:
            raise ValueError("a step needs its scheduled requests or their decode batch")
        self._scheduled = scheduled
        self.preempted = preempted
        self.num_batched_tokens = num_batched_tokens
        self.ahead = ahead  # scheduled by schedule_ahead(), before the previous step's tokens were known
        self.decode = decode

    @property
    def scheduled(self) -> tuple[ScheduledRequest, ...]:
        if self._scheduled is None:
            self._scheduled = self.decode.as_scheduled()  # type: ignore[union-attr]
        return self._scheduled

    @property
    def num_seqs(self) -> int:
        return len(self.decode.requests) if self.decode is not None else len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return self.num_seqs == 0

    @cached_property
    def is_decode(self) -> bool:
        """Every request computes one token and samples (a CUDA graph can run the step)."""
        return self.decode is not None or (
            self.num_batched_tokens == len(self.scheduled) and all(s.samples for s in self.scheduled))

    @cached_property
    def all_greedy(self) -> bool:
        """Every request that samples this step samples greedily."""
        if self.decode is not None:
            return self.decode.group.all_greedy
        return all(s.request.sampling.greedy for s in self.scheduled if s.samples)


class _Step:
    """What one ``schedule()`` call has decided so far."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: list[ScheduledRequest] = []
        self.preempted: list[Request] = []

    def add(self, request: Request, num_new_tokens: int) -> None:
        start = request.num_computed_tokens
        samples = start + num_new_tokens == len(request.prompt_token_ids) + len(request.output_token_ids)
        self.scheduled.append(ScheduledRequest(request, num_new_tokens, start, samples))
        self.budget -= num_new_tokens

    def output(self, max_num_batched_tokens: int) -> SchedulerOutput:
        used = max_num_batched_tokens - self.budget
        return SchedulerOutput(tuple(self.scheduled), tuple(self.preempted), used)


class Scheduler:
    """Continuous batching with chunked prefill fused into decode steps (vLLM v1's rule).

    There is no prefill or decode phase: every request has ``num_computed_tokens`` and each
    step hands some requests ``num_new_tokens`` more, within a budget of
    ``max_num_batched_tokens`` tokens and ``max_num_seqs`` running requests. Order of service:
    running requests with one token left (decodes), then running requests with a partly
    computed prompt, then waiting requests in arrival order (preempted ones first). When blocks
    run out, the newest running request not yet scheduled this step is preempted by recompute.

    Each ``schedule()`` must be followed by one ``update_from_output()`` for its output.
    The scheduler owns the requests' status, ``num_computed_tokens`` and ``block_ids``.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        prefill_chunk_size: int,
        max_model_len: int,
    ) -> None:
        limits = {
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_num_seqs": max_num_seqs,
            "prefill_chunk_size": prefill_chunk_size,
            "max_model_len": max_model_len,
        }
        for name, value in limits.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk_size = prefill_chunk_size
        self.max_model_len = max_model_len
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}
        self._waiting_for_kv: dict[str, Request] = {}
        self._held: dict[str, Request] = {}  # finished keep_kv requests whose blocks are still in use
        self.num_finished = 0  # requests ended so far (any reason): a cheap "did anything end since" check
        # bumped whenever a request joins or leaves the running set: a step scheduled ahead at the current
        # version still holds exactly the running requests, all RUNNING, and needs no per-request check
        self._running_version = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def has_schedulable_requests(self) -> bool:
        """Unfinished requests other than those waiting for remote KV (which a step cannot advance)."""
        return len(self._requests) > len(self._waiting_for_kv)

    @property
    def num_waiting_for_kv(self) -> int:
        return len(self._waiting_for_kv)

    @property
    def num_queued_tokens(self) -> int:
        """Tokens still to compute over all unfinished requests (a load signal; O(requests))."""
        return sum(r.num_uncomputed_tokens for r in self._requests.values())

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a new request at the back of the waiting queue; ValueError if it can never run."""
        self._check_admissible(request)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def add_remote_request(self, request: Request, num_remote_tokens: int) -> bool:
        """Decode side of a handoff: allocate blocks for tokens [0, num_remote_tokens) now and hold
        the request (WAITING_FOR_KV) until ``kv_ready`` or ``kv_failed``. When the blocks do not
        fit, queue it as an ordinary request instead (it computes its prompt here) and return False.
        """
        self._check_admissible(request)
        if not 0 < num_remote_tokens <= request.num_prompt_tokens:
            raise ValueError(f"num_remote_tokens must be in 1..{request.num_prompt_tokens}, got {num_remote_tokens}")
        if not self.block_manager.allocate_slots(request, num_remote_tokens):
            self.add_request(request)
            return False
        request.status = RequestStatus.WAITING_FOR_KV
        self._requests[request.request_id] = request
        self._waiting_for_kv[request.request_id] = request
        return True

    def kv_ready(self, request_id: str, num_tokens: int, first_token: int | None) -> list[Request]:
        """Tokens [0, num_tokens) now sit in the request's blocks; it joins the waiting queue's
        front (it arrived before anything queued since). ``first_token`` was sampled remotely
        after the whole prompt; without it the last prompt token is recomputed here for its logits.
        Returns the request in a list if that first token already finished it."""
        request = self._waiting_for_kv.pop(request_id)
        request.num_computed_tokens = min(num_tokens, request.num_prompt_tokens - (first_token is None))
        request.status = RequestStatus.WAITING
        self._waiting.appendleft(request)
        if first_token is None:
            return []
        request.output_token_ids.append(first_token)
        status = self._check_stop(request, first_token)
        if status is None:
            return []
        self.finish_request(request_id, status)
        return [request]

    def kv_failed(self, request_id: str) -> None:
        """The transfer failed: drop the blocks and compute the prompt here (no other code path)."""
        request = self._waiting_for_kv.pop(request_id)
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        self._waiting.appendleft(request)

    def release_kv(self, request_id: str) -> bool:
        """Free the blocks a finished ``keep_kv`` request still holds (prefill side, after sending)."""
        request = self._held.pop(request_id, None)
        if request is not None:
            self.block_manager.free(request)
        return request is not None

    def _check_admissible(self, request: Request) -> None:
        if request.request_id in self._requests or request.request_id in self._held:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        total = request.num_prompt_tokens + request.sampling.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: {request.num_prompt_tokens} prompt tokens + "
                f"{request.sampling.max_new_tokens} max new tokens exceed max_model_len {self.max_model_len}"
            )
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request.request_id!r}: {total} tokens need "
                f"{self.block_manager.blocks_needed(total)} KV blocks, the pool has only "
                f"{self.block_manager.num_blocks}"
            )

    def schedule(self) -> SchedulerOutput:
        step = _Step(self.max_num_batched_tokens)
        chunks = self._schedule_decodes(step)
        self._schedule_chunks(step, chunks)
        if not step.preempted:
            self._schedule_waiting(step)
        return step.output(self.max_num_batched_tokens)

    def schedule_ahead(self, previous: SchedulerOutput) -> SchedulerOutput | None:
        """The next step while ``previous`` (a decode step) still runs on the device: the same requests,
        one token further, their input tokens being ``previous``'s samples, which the runner takes from the
        device. None when the next step could be anything else: something waits, a request is mid-prompt,
        a request may end by length with ``previous``'s token, or blocks are short.

        A request that ends with ``previous``'s token by a stop token or string is still computed once more;
        ``update_from_output`` skips it (it is finished by then) and its blocks, freed at once, are only
        reused by steps queued after this one on the device.
        """
        if previous.is_empty or self._waiting or previous.preempted or previous.num_seqs != len(self._running):
            return None
        batch = previous.decode
        if batch is None or batch.running_version != self._running_version:
            batch = self._decode_prefix(previous.scheduled)
        return self._next_decode(batch, previous.num_seqs)

    def _decode_prefix(self, scheduled: tuple[ScheduledRequest, ...]) -> DecodeBatch:
        """The batch form of the longest prefix of ``scheduled`` whose requests decode one token, sample, run
        and keep no KV (once per run of steps ahead, not per step)."""
        running = RequestStatus.RUNNING
        count = 0
        for item in scheduled:
            request = item.request
            if item.num_new_tokens != 1 or not item.samples or request.status is not running or request.keep_kv:
                break
            count += 1
        prefix = scheduled[:count]
        group = DecodeGroup.of(tuple(item.request for item in prefix), self.max_model_len)
        return DecodeBatch(group, np.array([item.start for item in prefix], dtype=np.int64), self._running_version)

    def _next_decode(self, batch: DecodeBatch, num_seqs: int) -> SchedulerOutput | None:
        """``batch`` (of a step of ``num_seqs`` requests, or a prefix of it) one token further. Decided as a
        per-request pass would: the requests before the first that cannot run ahead (it may end by length,
        or the batch stops before it) get their blocks, then that one declines."""
        starts, ending = batch.starts, batch.ending_rows
        stop = ending[0] if ending else len(starts)
        grown = self._allocate_ahead(batch.requests, starts[:stop])
        if grown is None or stop < num_seqs:
            return None
        ahead = DecodeBatch(batch.group, starts + 1, self._running_version, batch.step + 1, grown)
        return SchedulerOutput(None, (), num_seqs, ahead=True, decode=ahead)

    def _allocate_ahead(self, requests: tuple[Request, ...], starts: np.ndarray) -> tuple[int, ...] | None:
        """Blocks up to the token after ``starts[i]`` for ``requests[i]``, in order; returns the rows that got
        blocks, or None at the first that cannot (a block allocated for nothing is freed with its request).
        Blocks cover position ``start`` already, so only a next position that opens a block can lack one."""
        block_size = self.block_manager.block_size
        allocate = self.block_manager.allocate_slots
        opening = np.flatnonzero((starts + 1) % block_size == 0)
        grown = []
        for i, start in zip(opening.tolist(), starts[opening].tolist(), strict=True):
            request = requests[i]
            if start + 2 > len(request.block_ids) * block_size:
                if not allocate(request, 2):
                    return None
                grown.append(i)
        return tuple(grown)

    def _schedule_decodes(self, step: _Step) -> list[Request]:
        """Running requests with one token left (decodes), oldest first; returns the ones with more left
        (partly computed prompts), in the same order. This loop runs once per request per step: keep it lean."""
        chunks: list[Request] = []
        running = RequestStatus.RUNNING
        for request in list(self._running.values()):
            uncomputed = len(request.prompt_token_ids) + len(request.output_token_ids) - request.num_computed_tokens
            if uncomputed > 1:
                chunks.append(request)
            elif uncomputed == 1 and step.budget > 0 and request.status is running \
                    and self._allocate_or_preempt(step, request, 1):
                step.add(request, 1)
        return chunks

    def _schedule_chunks(self, step: _Step, chunks: list[Request]) -> None:
        """Partly computed prompts of running requests (not preempted meanwhile), oldest first."""
        for request in chunks:
            if step.budget == 0:
                return
            if request.status != RequestStatus.RUNNING:
                continue
            num_new = min(request.num_uncomputed_tokens, self.prefill_chunk_size, step.budget)
            if self._allocate_or_preempt(step, request, num_new):
                step.add(request, num_new)

    def _allocate_or_preempt(self, step: _Step, request: Request, num_new_tokens: int) -> bool:
        """Allocate blocks for a running request, preempting newer ones; False if it preempted itself."""
        while not self.block_manager.allocate_slots(request, num_new_tokens):
            victim = self._newest_unscheduled(step)
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _newest_unscheduled(self, step: _Step) -> Request:
        scheduled = {item.request.request_id for item in step.scheduled}  # built only when blocks run out
        for request in reversed(self._running.values()):
            if request.request_id not in scheduled:
                return request
        raise AssertionError("unreachable: the request being scheduled is itself running and unscheduled")

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, keep the tokens, go back to the front of the queue."""
        del self._running[request.request_id]
        self._running_version += 1
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._waiting.appendleft(request)

    def _schedule_waiting(self, step: _Step) -> None:
        """Admit waiting requests in order; stop at the first one whose blocks do not fit."""
        while self._waiting and step.budget > 0 and len(self._running) < self.max_num_seqs:
            request = self._waiting[0]
            num_new = min(request.num_uncomputed_tokens, self.prefill_chunk_size, step.budget)
            if not self.block_manager.allocate_slots(request, num_new):
                return
            self._waiting.popleft()
            request.status = RequestStatus.RUNNING
            self._running[request.request_id] = request
            self._running_version += 1
            step.add(request, num_new)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Sequence[int | None]) -> list[Request]:
        """Apply a step's results: one entry per ``output.scheduled``, a token where it ``samples``.

        Requests finished or aborted since ``schedule()`` are skipped. Returns the requests that
        finished in this step; their blocks are already free.
        """
        _check_sampled(output, sampled_token_ids)
        batch = output.decode
        if batch is not None and batch.running_version == self._running_version:
            return self._update_decode(batch, sampled_token_ids)  # type: ignore[arg-type]
        finished: list[Request] = []
        for item, token_id in zip(output.scheduled, sampled_token_ids, strict=True):
            request = item.request
            if request.status.is_finished:
                continue
            request.num_computed_tokens += item.num_new_tokens
            if token_id is not None:
                request.output_token_ids.append(token_id)
                self._stop_if_done(request, token_id, finished)
        return finished

    def _update_decode(self, batch: DecodeBatch, sampled_token_ids: Sequence[int]) -> list[Request]:
        """A decode batch whose requests all still run: append the tokens, then check for a stop only the
        rows ``may_stop`` flags (the steady decode path: no per-request stop check)."""
        requests = batch.requests
        for request, token_id in zip(requests, sampled_token_ids, strict=True):
            request.num_computed_tokens += 1
            request.output_token_ids.append(token_id)
        finished: list[Request] = []
        for i in batch.may_stop(sampled_token_ids):
            self._stop_if_done(requests[i], sampled_token_ids[i], finished)
        return finished

    def _stop_if_done(self, request: Request, token_id: int, finished: list[Request]) -> None:
        status = self._check_stop(request, token_id)
        if status is not None:
            self._finish(request, status)
            finished.append(request)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        sampling = request.sampling
        num_output = len(request.output_token_ids)
        if num_output >= sampling.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        is_eos = token_id in request.eos_token_ids and not sampling.ignore_eos
        if is_eos or token_id in sampling.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if len(request.prompt_token_ids) + num_output >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End an unfinished request now with a finished ``status``; its blocks are freed at once.

        Returns the request, or None when the id is unknown or already finished.
        """
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests.get(request_id)
        if request is None:
            return None
        if request_id in self._waiting_for_kv:
            del self._waiting_for_kv[request_id]
        elif request_id not in self._running:
            self._waiting.remove(request)
        self._finish(request, status)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Abort in any state (FINISHED_ABORTED, blocks freed at once, held ones too); None for an unknown id."""
        held = self._held.get(request_id)
        if held is not None:
            self.release_kv(request_id)
            return held
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.num_finished += 1
        if self._running.pop(request.request_id, None) is not None:
            self._running_version += 1
        del self._requests[request.request_id]
        request.status = status
        if request.keep_kv and status != RequestStatus.FINISHED_ABORTED:
            self._held[request.request_id] = request
        else:
            self.block_manager.free(request)


def _check_sampled(output: SchedulerOutput, sampled_token_ids: Sequence[int | None]) -> None:
    if len(sampled_token_ids) != output.num_seqs:
        raise ValueError(f"got {len(sampled_token_ids)} sampled entries for {output.num_seqs} scheduled requests")
    if output.decode is not None and None not in sampled_token_ids:  # every row samples: one C-level pass
        return
    for item, token_id in zip(output.scheduled, sampled_token_ids, strict=True):
        if item.samples != (token_id is not None):
            raise ValueError(f"request {item.request.request_id!r}: samples={item.samples} but got token {token_id!r}")
