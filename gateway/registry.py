"""The gateway's view of the Redis worker registry, re-read in the background, plus one gRPC channel per worker.

Conventions (workers write, the gateway reads):

    key    f"{prefix}:worker:{worker_id}"     prefix defaults to "splitserve"
    value  a serialized splitserve.internal.v1.WorkerInfo, heartbeat_unix_s = time.time() of the write
    TTL    every heartbeat rewrites the key with SET ... EX WORKER_TTL_S (3 s), every
           HEARTBEAT_INTERVAL_S (1 s), so a dead worker's key expires by itself.

An entry is live while its key exists and its heartbeat is at most ``ttl_s`` old (the second test
also catches a worker whose Redis writes stopped but whose key a misconfigured TTL keeps alive).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import grpc
import structlog
from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from gateway import router
from gateway.settings import DEFAULT_PREFIX
from protos.splitserve.internal.v1 import worker_pb2

HEARTBEAT_INTERVAL_S = 1.0
WORKER_TTL_S = 3.0
CHANNEL_CLOSE_GRACE_S = 1.0

log = structlog.get_logger("gateway.registry")


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}:worker:{worker_id}"


def worker_pattern(prefix: str) -> str:
    """SCAN pattern matching every worker key of ``prefix`` (glob characters in the prefix escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":worker:*"


class WorkerRegistry:
    """Snapshot of the registry, refreshed every ``refresh_interval_s`` by ``start()``'s task.

    ``live`` and ``get`` read the last snapshot (no I/O). ``wait_gone`` resolves once a worker is
    missing from a refresh. Channels are created on first use per address and closed (after a
    short grace) when no live worker has that address any more.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: float = WORKER_TTL_S,
        refresh_interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s
        self._interval = refresh_interval_s
        self._clock = clock
        self._workers: dict[str, worker_pb2.WorkerInfo] = {}
        self._gone: dict[str, asyncio.Event] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._healthy = True
        self._unreadable: set[bytes] = set()

    def now(self) -> float:
        return self._clock()

    async def refresh(self) -> None:
        """Re-reads every worker entry (SCAN + MGET) and drops the dead ones."""
        keys = [k async for k in self._redis.scan_iter(match=worker_pattern(self._prefix), count=1000)]
        values = await self._redis.mget(keys) if keys else []
        workers = {}
        for key, value in zip(keys, values, strict=True):
            info = self._parse(key, value)
            if info is not None and router.is_live(info, self.now(), self.ttl_s):
                workers[info.worker_id] = info
        self._install(workers)

    async def start(self) -> None:
        """First refresh (errors propagate: Redis must be reachable), then refreshes in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="registry-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in self._channels.values()), *self._closing, return_exceptions=True)
        self._channels.clear()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs after every refresh."""
        self._listeners.append(callback)

    def workers(self) -> list[worker_pb2.WorkerInfo]:
        """Every entry of the last refresh still within its TTL now."""
        now = self.now()
        return [w for w in self._workers.values() if router.is_live(w, now, self.ttl_s)]

    def live(self, role: str) -> list[worker_pb2.WorkerInfo]:
        return [w for w in self.workers() if w.role == role]

    def get(self, worker_id: str) -> worker_pb2.WorkerInfo | None:
        info = self._workers.get(worker_id)
        return info if info is not None and router.is_live(info, self.now(), self.ttl_s) else None

    async def wait_gone(self, worker_id: str) -> None:
        """Returns once ``worker_id`` is missing from a refresh (at once if it is not live now)."""
        if self.get(worker_id) is None:
            return
        await self._gone.setdefault(worker_id, asyncio.Event()).wait()

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address)
        return ch

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception as e:
                self._install({w.worker_id: w for w in self.workers()})
                if self._healthy:
                    log.warning("registry refresh failed; keeping entries until their TTL", error=str(e))
                self._healthy = False
            else:
                if not self._healthy:
                    log.info("registry refresh works again")
                self._healthy = True

    def _install(self, workers: dict[str, worker_pb2.WorkerInfo]) -> None:
        old, self._workers = self._workers, workers
        for worker_id in old.keys() - workers.keys():
            log.info("worker gone", worker_id=worker_id, role=old[worker_id].role)
        for worker_id in workers.keys() - old.keys():
            log.info("worker joined", worker_id=worker_id, role=workers[worker_id].role,
                     address=workers[worker_id].address)
        for worker_id in [w for w in self._gone if w not in workers]:
            self._gone.pop(worker_id).set()
        self._close_unused_channels({w.address for w in workers.values()})
        for callback in self._listeners:
            callback()

    def _close_unused_channels(self, addresses: set[str]) -> None:
        for address in [a for a in self._channels if a not in addresses]:
            task = asyncio.create_task(self._channels.pop(address).close(CHANNEL_CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _parse(self, key: bytes, value: bytes | None) -> worker_pb2.WorkerInfo | None:
        if value is None:
            return None
        info = worker_pb2.WorkerInfo()
        try:
            info.ParseFromString(value)
        except DecodeError:
            info.Clear()
        if info.worker_id and info.address:
            return info
        if key not in self._unreadable:
            self._unreadable.add(key)
            log.warning("registry entry is not a WorkerInfo with worker_id and address; ignored", key=key)
        return None
