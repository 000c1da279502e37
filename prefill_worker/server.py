"""PrefillWorker servicer: prefill tokens [0, n), send their KV chunk by chunk, return the first token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import structlog

from engine.outputs import RequestOutput
from kvtransfer import KVSender, TransferResult
from protos.splitserve.internal.v1 import worker_pb2, worker_pb2_grpc
from worker_common import metrics
from worker_common.runtime import WorkerRuntime, first_token_params, sampling_from_proto

log = structlog.get_logger(__name__)
ROLE = "prefill"
_DONE = object()  # end of the chunk queue


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.senders: dict[str, KVSender] = {}

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self, server)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> worker_pb2.PrefillResponse:
        rid, n = request.request_id, request.num_prefill_tokens
        structlog.contextvars.bind_contextvars(request_id=rid)
        prompt = list(request.prompt_token_ids)
        if not 0 < n <= len(prompt):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"num_prefill_tokens must be in 1..{len(prompt)}")
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        progress = _Progress(time.monotonic())
        self.rt.loop.subscribe(rid, lambda out: self._on_step(rid, out, chunks, progress))
        sampling = first_token_params(sampling_from_proto(request.sampling))
        try:
            await self.rt.loop.call(lambda: self.rt.engine.add_request(prompt[:n], sampling, rid, keep_kv=True))
            response = await self._transfer(request, chunks, progress)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.rt.loop.unsubscribe(rid)
            sender = self.senders.pop(rid, None)
            if sender is not None:
                sender.abort("prefill request ended")
            await self.rt.loop.call(lambda: self.rt.engine.abort_request(rid))  # frees held blocks
            structlog.contextvars.unbind_contextvars("request_id")
        metrics.REQUESTS.labels(ROLE, "ok" if response.transfer_ok else "transfer_failed").inc()
        return response

    def _on_step(self, rid: str, out: RequestOutput, chunks: asyncio.Queue[Any], progress: _Progress) -> None:
        """Between steps: copy out the KV computed by this one before any block could be reused."""
        progress.first_step = progress.first_step or time.monotonic()
        if out.num_computed_tokens > progress.sent:
            kv = self.rt.engine.export_kv(rid, progress.sent, out.num_computed_tokens)
            chunks.put_nowait((progress.sent, kv))
            metrics.PREFILL_TOKENS.labels(ROLE).inc(out.num_computed_tokens - progress.sent)
            progress.sent = out.num_computed_tokens
        if out.finished:
            progress.first_token = out.token_ids[0] if out.token_ids else None
            progress.done = time.monotonic()
            chunks.put_nowait(_DONE)

    async def _transfer(self, request: worker_pb2.PrefillRequest, chunks: asyncio.Queue[Any],
                        progress: _Progress) -> worker_pb2.PrefillResponse:
        rid, timeout = request.request_id, self.rt.settings.transfer_timeout_s
        try:
            dest = await self.rt.metadata.wait_for(rid, timeout)
            if dest.num_tokens == 0:
                raise RuntimeError(f"decode worker {dest.decode_worker_id} had no room for the KV")
            sender = self.senders[rid] = await self.rt.transport.open_sender(dest, self.rt.kv_layout)
            while (item := await chunks.get()) is not _DONE:
                await sender.send(*item)
            whole = request.num_prefill_tokens == len(request.prompt_token_ids)
            result = await sender.finish(progress.first_token if whole else None, timeout)
        except Exception as e:  # the request must still complete: the decode worker recomputes
            log.warning("kv_transfer_failed", error=str(e))
            metrics.TRANSFERS.labels(ROLE, "failed").inc()
            return worker_pb2.PrefillResponse(transfer_ok=False, error=str(e), **progress.timings())
        return self._response(request, result, progress)

    def _response(self, request: worker_pb2.PrefillRequest, result: TransferResult, progress: _Progress
                  ) -> worker_pb2.PrefillResponse:
        ok = result.ok
        metrics.TRANSFERS.labels(ROLE, "done" if ok else "failed").inc()
        metrics.TRANSFER_BYTES.labels(ROLE).inc(result.bytes)
        whole = request.num_prefill_tokens == len(request.prompt_token_ids)
        return worker_pb2.PrefillResponse(
            has_first_token=ok and whole and progress.first_token is not None,
            first_token=progress.first_token or 0, transfer_ok=ok, error=result.error or "",
            transfer_ms=result.seconds * 1000, transfer_bytes=result.bytes, **progress.timings(),
        )

    async def Cancel(self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext
                     ) -> worker_pb2.CancelResponse:
        sender = self.senders.pop(request.request_id, None)
        if sender is not None:
            sender.abort("cancelled")
        found = await self.rt.loop.call(lambda: self.rt.engine.abort_request(request.request_id))
        return worker_pb2.CancelResponse(found=found or sender is not None)

    async def Stats(self, request: worker_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerInfo:
        return self.rt.info()


class _Progress:
    """What one prefill has done so far (written between steps, read by the transfer task)."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_step = 0.0
        self.done = 0.0
        self.sent = 0
        self.first_token: int | None = None

    def timings(self) -> dict[str, float]:
        end = self.done or time.monotonic()
        return {"queue_ms": ((self.first_step or end) - self.arrival) * 1000, "prefill_ms": (end - self.arrival) * 1000}
