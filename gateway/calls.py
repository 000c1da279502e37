"""The gateway's RPCs to workers: stubs over the registry's cached channels, and fire-and-forget control calls."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import grpc
import structlog

from gateway.registry import WorkerRegistry
from protos.splitserve.internal.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger("gateway.calls")


class WorkerCalls:
    """Opens calls to the worker at ``WorkerInfo.address``.

    ``timeout_s`` arguments are the client's remaining time (None = no deadline), so a worker call
    never outlives the request. Control calls (Cancel, AbandonTransfer) run in the background with
    ``control_timeout_s`` and only log failures: the worker may be dead, and its KV with it.
    """

    def __init__(self, registry: WorkerRegistry, control_timeout_s: float) -> None:
        self._registry = registry
        self._control_timeout_s = control_timeout_s
        self._background: set[asyncio.Task[Any]] = set()

    def decode(
        self, worker: worker_pb2.WorkerInfo, request: worker_pb2.DecodeRequest, timeout_s: float | None
    ) -> grpc.aio.UnaryStreamCall:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._registry.channel(worker.address))
        return stub.Decode(request, timeout=timeout_s)

    async def prefill(
        self, worker: worker_pb2.WorkerInfo, request: worker_pb2.PrefillRequest, timeout_s: float | None
    ) -> worker_pb2.PrefillResponse:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._registry.channel(worker.address))
        return await stub.Prefill(request, timeout=timeout_s)

    def cancel(self, worker: worker_pb2.WorkerInfo, request_id: str) -> None:
        """Asks ``worker`` to drop ``request_id`` and free its KV blocks."""
        self._spawn(self._control(worker, "Cancel", request_id))

    def abandon_transfer(self, worker: worker_pb2.WorkerInfo, request_id: str) -> None:
        """Tells the decode ``worker`` that no KV will come: it recomputes the prompt itself."""
        self._spawn(self._control(worker, "AbandonTransfer", request_id))

    async def drain(self, timeout_s: float) -> None:
        """Waits (at most ``timeout_s``) for the control calls still under way."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout_s)

    async def _control(self, worker: worker_pb2.WorkerInfo, method: str, request_id: str) -> None:
        channel = self._registry.channel(worker.address)
        stub: Any = (
            worker_pb2_grpc.PrefillWorkerStub(channel) if worker.role == "prefill"
            else worker_pb2_grpc.DecodeWorkerStub(channel)
        )
        try:
            await getattr(stub, method)(worker_pb2.CancelRequest(request_id=request_id),
                                        timeout=self._control_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.info("control call failed", method=method, worker_id=worker.worker_id, code=e.code().name,
                     details=e.details())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
