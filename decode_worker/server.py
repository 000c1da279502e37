"""DecodeWorker servicer: allocate first, receive KV, then stream tokens (proto <-> engine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog

from engine.outputs import RequestOutput
from kvtransfer import Destination, KVReceiver, TransferResult, TransferState
from protos.splitserve.internal.v1 import worker_pb2, worker_pb2_grpc
from worker_common import metrics
from worker_common.runtime import WorkerRuntime, sampling_from_proto

log = structlog.get_logger(__name__)
ROLE = "decode"


@dataclass
class _Handoff:
    """One request's KV arriving from a prefill worker."""

    receiver: KVReceiver | None  # None when the blocks did not fit and the prompt is computed here
    num_tokens: int
    result: TransferResult | None = None


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.handoffs: dict[str, _Handoff] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeStreamResponse]:
        rid = request.request_id
        structlog.contextvars.bind_contextvars(request_id=rid)
        queue = self.rt.loop.subscribe(rid)
        finished = False
        try:
            await self._admit(request)
            arrival, first_at, n_out = time.monotonic(), 0.0, 0
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                if out.new_token_ids:
                    first_at = first_at or time.monotonic()
                    n_out = len(out.token_ids)
                yield self._message(request, out)
            metrics.REQUESTS.labels(ROLE, out.finish_reason or "").inc()
            metrics.OUTPUT_TOKENS.labels(ROLE).inc(n_out)
            metrics.TTFT.labels(ROLE).observe(first_at - arrival)
            if n_out > 1:
                metrics.TPOT.labels(ROLE).observe((time.monotonic() - first_at) / (n_out - 1))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.rt.loop.unsubscribe(rid)
            handoff = self.handoffs.pop(rid, None)
            if handoff is not None and handoff.receiver is not None:
                handoff.receiver.abort("decode request ended")
            if not finished:  # cancelled, deadline, error: free the KV now
                await self.rt.loop.call(lambda: self.rt.engine.abort_request(rid))
                metrics.REQUESTS.labels(ROLE, "cancelled").inc()
            structlog.contextvars.unbind_contextvars("request_id")

    async def _admit(self, request: worker_pb2.DecodeRequest) -> None:
        rid, prompt, n = request.request_id, list(request.prompt_token_ids), request.num_remote_tokens
        sampling = sampling_from_proto(request.sampling)
        engine = self.rt.engine
        if n == 0:
            await self.rt.loop.call(lambda: engine.add_request(prompt, sampling, rid))
            return
        blocks = await self.rt.loop.call(lambda: engine.add_remote_request(prompt, sampling, rid, n))
        receiver = None
        if blocks is not None:
            receiver = self.rt.transport.expect(
                rid, self.rt.kv_layout, n, lambda start, kv: engine.import_kv(rid, start, kv)
            )
        self.handoffs[rid] = _Handoff(receiver, n)
        # num_tokens 0 tells the prefill worker that the blocks did not fit: it stops at once.
        await self.rt.metadata.publish(
            Destination(rid, self.rt.worker_id, self.rt.kv_endpoint, tuple(blocks or ()),
                        n if blocks else 0, self.rt.kv_layout),
            ttl_s=self.rt.settings.transfer_timeout_s * 2,
        )
        if receiver is not None:
            asyncio.create_task(self._await_kv(rid, receiver, n))

    async def _await_kv(self, rid: str, receiver: KVReceiver, n: int) -> None:
        result = await receiver.wait(self.rt.settings.transfer_timeout_s)
        await self.rt.metadata.delete(rid)
        handoff = self.handoffs.get(rid)
        if handoff is None:
            return  # the request ended meanwhile; its blocks were freed with it
        handoff.result = result
        engine = self.rt.engine
        if result.state is TransferState.DONE:
            metrics.TRANSFERS.labels(ROLE, "done").inc()
            metrics.TRANSFER_BYTES.labels(ROLE).inc(result.bytes)
            metrics.TRANSFER_SECONDS.labels(ROLE).observe(result.seconds)
            outputs = await self.rt.loop.call(lambda: engine.kv_ready(rid, n, result.first_token))
            self.rt.loop.publish(outputs)
        else:
            metrics.TRANSFERS.labels(ROLE, "failed").inc()
            log.warning("kv_transfer_failed_recomputing", request_id=rid, error=result.error)
            await self.rt.loop.call(lambda: engine.kv_failed(rid))

    def _message(self, request: worker_pb2.DecodeRequest, out: RequestOutput) -> worker_pb2.DecodeStreamResponse:
        msg = worker_pb2.DecodeStreamResponse(
            token_ids=out.new_token_ids, output_index=len(out.token_ids) - len(out.new_token_ids)
        )
        if out.finished:
            handoff = self.handoffs.get(request.request_id)
            received = bool(handoff and handoff.result and handoff.result.state is TransferState.DONE)
            here = len(request.prompt_token_ids) - (request.num_remote_tokens if received else 0)
            metrics.PREFILL_TOKENS.labels(ROLE).inc(here)
            msg.finish_reason = out.finish_reason or ""
            msg.prefill_tokens_here = here
            msg.kv_received = received
            if received and handoff and handoff.result:
                msg.transfer_ms = handoff.result.seconds * 1000
                msg.transfer_bytes = handoff.result.bytes
        return msg

    async def AbandonTransfer(self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext
                              ) -> worker_pb2.CancelResponse:
        handoff = self.handoffs.get(request.request_id)
        if handoff is None or handoff.receiver is None:
            return worker_pb2.CancelResponse(found=False)
        handoff.receiver.abort("the prefill worker gave up")
        return worker_pb2.CancelResponse(found=True)

    async def Cancel(self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext
                     ) -> worker_pb2.CancelResponse:
        handoff = self.handoffs.pop(request.request_id, None)
        if handoff is not None and handoff.receiver is not None:
            handoff.receiver.abort("cancelled")
        found = await self.rt.loop.call(lambda: self.rt.engine.abort_request(request.request_id))
        return worker_pb2.CancelResponse(found=found)

    async def Stats(self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerInfo:
        return self.rt.info()
