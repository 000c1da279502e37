"""Drives an Engine from asyncio: steps run in one background thread, everything else between steps.

Only this loop touches the engine (``call`` queues a function to run between two steps), so
the engine needs no locks. After each step the outputs go to per-request queues; a request's
``on_step`` hook runs first, still between steps (the prefill worker copies KV out there,
before the next step could reuse a preempted request's blocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from engine.engine import Engine
from engine.outputs import RequestOutput

log = structlog.get_logger(__name__)
T = TypeVar("T")


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._calls: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._hooks: dict[str, Callable[[RequestOutput], None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    @property
    def task(self) -> asyncio.Task[None]:
        """The loop's task: it ends only by ``stop()`` or by an engine failure (which it raises)."""
        assert self._task is not None, "start() first"
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the engine between steps and return its result (or raise its error)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.append((fn, future))
        self._wake.set()
        return await future

    def subscribe(
        self, request_id: str, on_step: Callable[[RequestOutput], None] | None = None
    ) -> asyncio.Queue[RequestOutput]:
        """Outputs of ``request_id`` from now on; ``on_step`` runs on each before the next step."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        if on_step is not None:
            self._hooks[request_id] = on_step
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._hooks.pop(request_id, None)

    def publish(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            hook = self._hooks.get(out.request_id)
            if hook is not None:
                hook(out)
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    async def _run(self) -> None:
        while True:
            self._apply_calls()
            if self.engine.scheduler.has_schedulable_requests():
                try:
                    outputs = await asyncio.to_thread(self.engine.step)
                except Exception:
                    log.exception("engine_step_failed")
                    raise
                self.steps += 1
                self.publish(outputs)
                await asyncio.sleep(0)  # let handlers queue their calls before the next step
            else:
                await self._wake.wait()
            self._wake.clear()

    def _apply_calls(self) -> None:
        calls, self._calls = self._calls, []
        for fn, future in calls:
            if future.cancelled():
                continue
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
