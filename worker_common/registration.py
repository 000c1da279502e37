"""A worker's entry in the Redis registry: written at start, refreshed by a heartbeat, deleted at exit.

Key ``<prefix>:worker:<worker_id>`` holds a serialized ``WorkerInfo`` with a TTL of a few
heartbeats, so a worker that dies without deregistering drops out by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import structlog

from protos.splitserve.internal.v1 import worker_pb2

log = structlog.get_logger(__name__)


def registry_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


class Registration:
    def __init__(self, redis: aioredis.Redis, prefix: str, info: Callable[[], worker_pb2.WorkerInfo],
                 heartbeat_s: float, ttl_s: float) -> None:
        self.redis, self.info, self.heartbeat_s, self.ttl_s = redis, info, heartbeat_s, ttl_s
        self.key = registry_key(prefix, info().worker_id)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._beat()
        self._task = asyncio.create_task(self._loop())

    async def _beat(self) -> None:
        info = self.info()
        info.heartbeat_unix_s = time.time()
        await self.redis.set(self.key, info.SerializeToString(), px=int(self.ttl_s * 1000))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except Exception as e:  # Redis away for a moment: keep trying, the TTL decides
                log.warning("heartbeat_failed", error=str(e))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await self.redis.delete(self.key)
        except Exception as e:
            log.warning("deregister_failed", error=str(e))
