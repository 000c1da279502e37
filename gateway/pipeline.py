"""One request: validate -> route -> prefill || decode -> stream, with retries, deadlines and cancellation.

    gateway ──Decode(prompt, num_remote_tokens=n)──▶ decode worker D   (opened first: D allocates)
        └────Prefill(prompt, n, D)──▶ prefill worker P ══KV [0, n) + first token══▶ D
    P's response may carry the first token (streamed at once); D's stream repeats it at output
    index 0 and the gateway drops the repeat. P fails -> AbandonTransfer(D): D recomputes.
    D dies -> the prompt plus the tokens so far go to another decode worker, which computes all.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import structlog

from gateway import router
from gateway.attempt import Attempt, Run
from gateway.calls import WorkerCalls
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.output import Delta, Output
from gateway.registry import WorkerRegistry
from gateway.settings import GatewaySettings
from gateway.tokenizer import ModelSpec, TextTokenizer
from gateway.validation import InvalidRequest, ValidRequest, validate
from protos.splitserve.internal.v1 import worker_pb2
from protos.splitserve.v1 import generation_pb2

log = structlog.get_logger("gateway")

Emit = Callable[[Delta], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    """A finished request. ``tail_text`` is the text released only at the end (already part of ``text``)."""

    request_id: str
    text: str
    tail_text: str
    token_ids: list[int]
    finish_reason: str
    usage: generation_pb2.Usage
    timings: generation_pb2.Timings
    prefill_worker: str
    decode_worker: str


class Pipeline:
    """Runs requests for one gateway: admission, validation, routing, worker calls, retries.

    ``run`` raises GatewayError for every ending the client should see as a status; when the caller
    is cancelled (client gone) it cancels the worker calls and sends Cancel to the workers.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        tokenizer: TextTokenizer,
        spec: ModelSpec,
        registry: WorkerRegistry,
        metrics: GatewayMetrics,
    ) -> None:
        self._settings = settings
        self._tokenizer = tokenizer
        self._spec = spec
        self._registry = registry
        self._metrics = metrics
        self.calls = WorkerCalls(registry, settings.cancel_timeout_s)
        self._inflight: set[str] = set()
        self._local_load: Counter[str] = Counter()

    def max_model_len(self) -> int:
        """The usable context: the model's (capped by settings), lowered by any live decode worker's."""
        workers = self._registry.workers()
        limits = [w.max_model_len for w in workers if w.role in router.DECODE_ROLES and w.max_model_len]
        return min([self._spec.max_model_len, *limits])

    async def run(self, request: generation_pb2.GenerateRequest, emit: Emit, timeout_s: float | None) -> Result:
        """Serves ``request``; ``emit`` gets new output as it comes; ``timeout_s`` is the client's remaining time."""
        code, start = grpc.StatusCode.OK, time.perf_counter()
        try:
            return await self._admit(request, emit, timeout_s)
        except GatewayError as e:
            code = e.code
            raise
        except asyncio.CancelledError:
            late = timeout_s is not None and time.perf_counter() - start >= timeout_s
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._metrics.requests.labels(code.name).inc()

    async def _admit(self, request: generation_pb2.GenerateRequest, emit: Emit, timeout_s: float | None) -> Result:
        if len(self._inflight) >= self._settings.max_inflight:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway has {len(self._inflight)} requests in flight, its limit; retry later")
        try:
            valid = validate(request, self._tokenizer, self._spec.vocab_size, self.max_model_len())
        except InvalidRequest as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if valid.request_id in self._inflight:
            raise GatewayError(grpc.StatusCode.ALREADY_EXISTS, f"request {valid.request_id!r} is already in flight")
        self._inflight.add(valid.request_id)
        self._metrics.inflight.inc()
        try:
            with structlog.contextvars.bound_contextvars(request_id=valid.request_id):
                return await self._run_logged(valid, emit, timeout_s)
        finally:
            self._inflight.discard(valid.request_id)
            self._metrics.inflight.dec()

    async def _run_logged(self, req: ValidRequest, emit: Emit, timeout_s: float | None) -> Result:
        try:
            return await self._run(req, emit, timeout_s)
        except GatewayError as e:
            log.info("request failed", code=e.code.name, error=e.message)
            raise
        except asyncio.CancelledError:
            log.info("request cancelled by the client or its deadline")
            raise

    async def _run(self, req: ValidRequest, emit: Emit, timeout_s: float | None) -> Result:
        received_s = time.perf_counter()
        deadline_s = None if timeout_s is None else received_s + timeout_s
        out = Output(req.request_id, self._tokenizer, req.prompt_token_ids, req.stop, req.max_new_tokens)
        run = Run(req, out, received_s, deadline_s)
        log.info("request received", prompt_tokens=len(req.prompt_token_ids), max_new_tokens=req.max_new_tokens)
        try:
            await asyncio.wait_for(self._attempts(run, emit), timeout_s)
        except asyncio.TimeoutError:
            self._cancel_workers(run)
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline exceeded after {len(out.token_ids)} output tokens") from None
        except BaseException:
            self._cancel_workers(run)
            raise
        return self._finish(run)

    async def _attempts(self, run: Run, emit: Emit) -> None:
        exclude: set[str] = set()
        failure = ""
        for attempt in range(self._settings.retries + 1):
            decode = self._pick(router.DECODE_ROLES, exclude)
            if decode is None:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, _no_decode_message(exclude, failure))
            prefill, num_prefill_tokens = self._plan(run) if attempt == 0 else (None, 0)
            with self._counted(decode, prefill):
                failure = await Attempt(run, self.calls, self._registry, decode, prefill, num_prefill_tokens,
                                        self._metrics).run(emit)
            if not failure:
                return
            log.warning("decode attempt failed", decode_worker=decode.worker_id, error=failure,
                        output_tokens=len(run.out.token_ids))
            self.calls.cancel(decode, run.req.request_id)
            exclude.add(decode.worker_id)
            if self._ended_anyway(run):
                return
            self._metrics.retries.inc()
        raise GatewayError(grpc.StatusCode.UNAVAILABLE,
                           f"decode failed on {len(exclude)} workers; the last error: {failure}")

    @contextmanager
    def _counted(self, *workers: worker_pb2.WorkerInfo | None) -> Iterator[None]:
        """Counts the request on these workers while it runs there (the router's gateway-local load)."""
        ids = [w.worker_id for w in workers if w is not None]
        self._local_load.update(ids)
        try:
            yield
        finally:
            self._local_load.subtract(ids)
            for worker_id in ids:
                if self._local_load[worker_id] <= 0:
                    del self._local_load[worker_id]

    def _pick(self, roles: frozenset[str], exclude: set[str]) -> worker_pb2.WorkerInfo | None:
        return router.pick(self._registry.workers(), roles, self._registry.now(), self._registry.ttl_s,
                           exclude, self._local_load)

    def _plan(self, run: Run) -> tuple[worker_pb2.WorkerInfo | None, int]:
        s = self._settings
        n = router.plan(len(run.req.prompt_token_ids), s.chunk_size, s.max_prefill_chunks,
                        s.short_prompt_threshold).num_prefill_tokens
        prefill = self._pick(router.PREFILL_ROLES, set()) if n else None
        return (prefill, n) if prefill is not None else (None, 0)

    def _ended_anyway(self, run: Run) -> bool:
        """After a decode worker died: is the output complete already (max tokens, EOS, stop token)?"""
        out, sampling = run.out, run.req.sampling
        last = out.token_ids[-1] if out.token_ids else None
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self._spec.eos_token_ids))
        if out.stopped or last in stop_ids:
            run.finish_reason = "stop"
        elif out.complete:
            run.finish_reason = "length"
        return bool(run.finish_reason)

    def _cancel_workers(self, run: Run) -> None:
        for worker in (run.decode, run.prefill):
            if worker is not None:
                self.calls.cancel(worker, run.req.request_id)

    def _finish(self, run: Run) -> Result:
        tail = run.out.flush()
        usage, timings = run.usage(), run.timings(time.perf_counter())
        self._observe(usage, timings)
        log.info("request done", finish_reason=run.finish_reason, completion_tokens=usage.completion_tokens,
                 ttft_ms=round(timings.ttft_ms, 2), e2e_ms=round(timings.e2e_ms, 2))
        return Result(
            request_id=run.req.request_id, text=run.out.text, tail_text=tail, token_ids=list(run.out.token_ids),
            finish_reason=run.finish_reason, usage=usage, timings=timings,
            prefill_worker=run.prefill.worker_id if run.prefill is not None and run.transfer_ok else "",
            decode_worker=run.decode.worker_id if run.decode is not None else "",
        )

    def _observe(self, usage: generation_pb2.Usage, timings: generation_pb2.Timings) -> None:
        m = self._metrics
        if usage.completion_tokens:
            m.ttft.observe(timings.ttft_ms / 1e3)
        if usage.completion_tokens > 1:
            m.tpot.observe(timings.tpot_ms / 1e3)
        m.e2e.observe(timings.e2e_ms / 1e3)
        m.prefill_tokens.labels("prefill").inc(usage.prefill_tokens_on_prefill_worker)
        m.prefill_tokens.labels("decode").inc(usage.prefill_tokens_on_decode_worker)
        m.transfer_bytes.inc(timings.transfer_bytes)
        m.transfer_seconds.inc(timings.transfer_ms / 1e3)


def _no_decode_message(exclude: set[str], failure: str) -> str:
    if not exclude:
        return "no decode worker is alive: start one, or check that it registers in Redis under this prefix"
    return f"no other live decode worker after {len(exclude)} failed; the last error: {failure}"
