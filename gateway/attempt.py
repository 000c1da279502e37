"""One decode attempt of a request (plus its prefill on the first attempt), and the request's state across attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from gateway.calls import WorkerCalls
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.output import Delta, Output
from gateway.registry import WorkerRegistry
from gateway.validation import ValidRequest
from protos.splitserve.internal.v1 import worker_pb2
from protos.splitserve.v1 import generation_pb2

log = structlog.get_logger("gateway")

PREFILL_SETTLE_S = 0.5
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})

Emit = Callable[[Delta], Awaitable[None]]


@dataclass
class Run:
    """A request's state across decode attempts. Times are time.perf_counter() seconds."""

    req: ValidRequest
    out: Output
    received_s: float
    deadline_s: float | None
    dispatched_s: float | None = None
    prefill: worker_pb2.WorkerInfo | None = None
    num_prefill_tokens: int = 0
    prefill_response: worker_pb2.PrefillResponse | None = None
    decode: worker_pb2.WorkerInfo | None = None
    decode_last: worker_pb2.DecodeStreamResponse | None = None
    finish_reason: str = ""

    def remaining_s(self) -> float | None:
        return None if self.deadline_s is None else max(self.deadline_s - time.perf_counter(), 0.0)

    @property
    def transfer_ok(self) -> bool:
        return self.prefill_response is not None and self.prefill_response.transfer_ok

    def usage(self) -> generation_pb2.Usage:
        on_prefill = self.num_prefill_tokens if self.transfer_ok else 0
        prompt_tokens = len(self.req.prompt_token_ids)
        on_decode = self.decode_last.prefill_tokens_here if self.decode_last is not None else prompt_tokens - on_prefill
        return generation_pb2.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=len(self.out.token_ids),
            prefill_tokens_on_prefill_worker=on_prefill, prefill_tokens_on_decode_worker=on_decode,
        )

    def timings(self, now_s: float) -> generation_pb2.Timings:
        p = self.prefill_response or worker_pb2.PrefillResponse()
        last = self.decode_last or worker_pb2.DecodeStreamResponse()
        first, final, n = self.out.first_token_s, self.out.last_token_s, len(self.out.token_ids)
        dispatched = self.dispatched_s if self.dispatched_s is not None else now_s
        return generation_pb2.Timings(
            queue_ms=(dispatched - self.received_s) * 1e3 + p.queue_ms,
            prefill_ms=p.prefill_ms,
            transfer_ms=p.transfer_ms or last.transfer_ms,
            transfer_bytes=p.transfer_bytes or last.transfer_bytes,
            ttft_ms=(first - self.received_s) * 1e3 if first is not None else 0.0,
            tpot_ms=(final - first) * 1e3 / (n - 1) if first is not None and final is not None and n > 1 else 0.0,
            e2e_ms=(now_s - self.received_s) * 1e3,
        )


class Attempt:
    """Decode on ``decode`` (and, when ``num_prefill_tokens`` > 0, prefill on ``prefill``) until the output ends.

    ``run(emit)`` returns "" once the request finished (``Run.finish_reason`` set), or why the
    decode worker failed in a way another worker may fix (it died, left the registry, ...). Other
    errors raise. Every call it opened is cancelled when it returns or is cancelled.
    """

    def __init__(
        self,
        run: Run,
        calls: WorkerCalls,
        registry: WorkerRegistry,
        decode: worker_pb2.WorkerInfo,
        prefill: worker_pb2.WorkerInfo | None,
        num_prefill_tokens: int,
        metrics: GatewayMetrics,
    ) -> None:
        self._run, self._calls, self._registry, self._metrics = run, calls, registry, metrics
        self._decode, self._prefill, self._num_prefill_tokens = decode, prefill, num_prefill_tokens
        self._offset = len(run.out.token_ids)
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._prefill_done = False

    async def run(self, emit: Emit) -> str:
        run = self._run
        run.decode = self._decode
        if self._prefill is not None:
            run.prefill, run.num_prefill_tokens = self._prefill, self._num_prefill_tokens
        if run.dispatched_s is None:
            run.dispatched_s = time.perf_counter()
        call = self._calls.decode(self._decode, self._decode_request(), run.remaining_s())
        tasks = [asyncio.create_task(self._read(call)), asyncio.create_task(self._watch())]
        prefill_task = asyncio.create_task(self._prefill_call()) if self._prefill is not None else None
        try:
            failure = await self._consume(emit)
            if not failure and prefill_task is not None:
                await asyncio.wait({prefill_task}, timeout=PREFILL_SETTLE_S)
            return failure
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            if self._prefill is not None and prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
                self._calls.cancel(self._prefill, run.req.request_id)

    def _decode_request(self) -> worker_pb2.DecodeRequest:
        req = self._run.req
        sampling = generation_pb2.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_new_tokens = req.max_new_tokens - self._offset
        return worker_pb2.DecodeRequest(
            request_id=req.request_id, prompt_token_ids=[*req.prompt_token_ids, *self._run.out.token_ids],
            sampling=sampling, num_remote_tokens=self._num_prefill_tokens,
            prefill_worker_id=self._prefill.worker_id if self._prefill is not None else "",
        )

    async def _consume(self, emit: Emit) -> str:
        run = self._run
        while not (run.finish_reason and not run.out.has_gap):
            self._check_gap()
            kind, payload = await self._events.get()
            if kind == "prefill":
                self._prefill_done = True
                delta = self._on_prefill(payload)
            elif kind == "message":
                delta = run.out.offer(self._offset + payload.output_index, payload.token_ids)
                if payload.finish_reason:
                    run.decode_last, run.finish_reason = payload, payload.finish_reason
            elif run.finish_reason:
                continue
            else:
                return self._on_stream_end(kind, payload)
            if delta is not None:
                await emit(delta)
            if run.out.stopped:
                run.finish_reason = "stop"
                self._calls.cancel(self._decode, run.req.request_id)
        return ""

    def _check_gap(self) -> None:
        """The decode stream ended with tokens missing before its last ones, and no prefill response can fill them."""
        run = self._run
        if run.finish_reason and run.out.has_gap and (self._prefill is None or self._prefill_done):
            raise GatewayError(grpc.StatusCode.INTERNAL, f"decode worker {self._decode.worker_id} never sent "
                               f"output token {len(run.out.token_ids)}")

    def _on_prefill(self, payload: worker_pb2.PrefillResponse | grpc.aio.AioRpcError) -> Delta | None:
        error = _prefill_error(payload)
        if error:
            log.warning("prefill failed; the decode worker recomputes the prompt",
                        prefill_worker=self._prefill.worker_id if self._prefill else "", error=error)
            self._metrics.abandoned_transfers.inc()
            self._calls.abandon_transfer(self._decode, self._run.req.request_id)
            return None
        assert isinstance(payload, worker_pb2.PrefillResponse)
        return self._run.out.offer(0, [payload.first_token]) if payload.has_first_token else None

    def _on_stream_end(self, kind: str, payload: Any) -> str:
        worker = f"decode worker {self._decode.worker_id}"
        if kind == "gone":
            return f"{worker} left the registry"
        if kind == "eof":
            return f"{worker} ended its stream without a finish reason"
        code, details = payload.code(), payload.details()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise GatewayError(code, f"deadline exceeded after {len(self._run.out.token_ids)} output tokens")
        if code in RETRYABLE:
            return f"{worker}: {code.name}: {details}"
        raise GatewayError(code, f"{worker}: {details}")

    async def _read(self, call: grpc.aio.UnaryStreamCall) -> None:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                self._events.put_nowait(("message", message))
            self._events.put_nowait(("eof", None))
        except grpc.aio.AioRpcError as e:
            self._events.put_nowait(("error", e))

    async def _watch(self) -> None:
        await self._registry.wait_gone(self._decode.worker_id)
        self._events.put_nowait(("gone", None))

    async def _prefill_call(self) -> None:
        run, prefill = self._run, self._prefill
        assert prefill is not None
        request = worker_pb2.PrefillRequest(
            request_id=run.req.request_id, prompt_token_ids=run.req.prompt_token_ids,
            num_prefill_tokens=self._num_prefill_tokens, sampling=run.req.sampling,
            decode_worker_id=self._decode.worker_id,
        )
        try:
            response = await self._calls.prefill(prefill, request, run.remaining_s())
        except grpc.aio.AioRpcError as e:
            self._events.put_nowait(("prefill", e))
            return
        run.prefill_response = response
        self._events.put_nowait(("prefill", response))


def _prefill_error(payload: worker_pb2.PrefillResponse | grpc.aio.AioRpcError) -> str:
    """Why the prefill did not deliver its KV ("" if it did)."""
    if isinstance(payload, grpc.aio.AioRpcError):
        return f"{payload.code().name}: {payload.details()}"
    return "" if payload.transfer_ok else payload.error or "transfer not acknowledged"
