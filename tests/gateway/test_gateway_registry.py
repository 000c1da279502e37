"""The registry reader against the real Redis: parsing, TTLs, departures and per-address channels."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway_fakes import REDIS_URL
from redis.asyncio import Redis

from gateway.registry import WorkerRegistry, worker_key, worker_pattern
from protos.splitserve.internal.v1 import worker_pb2


def entry(worker_id: str, role: str = "decode", age_s: float = 0.0, port: int = 1) -> bytes:
    return worker_pb2.WorkerInfo(worker_id=worker_id, role=role, address=f"127.0.0.1:{port}",
                                 heartbeat_unix_s=time.time() - age_s).SerializeToString()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[tuple[Redis, str]]:
    redis = Redis.from_url(REDIS_URL)
    await redis.ping()
    prefix = f"test-{uuid.uuid4().hex}*"  # a glob character in the prefix must not match other prefixes
    try:
        yield redis, prefix
    finally:
        keys = [k async for k in redis.scan_iter(match=worker_pattern(prefix))]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_refresh_reads_live_entries_and_skips_the_rest() -> None:
    async with redis_prefix() as (redis, prefix):
        await redis.set(worker_key(prefix, "d1"), entry("d1"), ex=5)
        await redis.set(worker_key(prefix, "p1"), entry("p1", role="prefill", port=2), ex=5)
        await redis.set(worker_key(prefix, "old"), entry("old", age_s=10), ex=5)
        await redis.set(worker_key(prefix, "junk"), b"\xff\x00not a proto", ex=5)
        await redis.set(worker_key(prefix.rstrip("*") + "x", "elsewhere"), entry("elsewhere"), ex=5)
        registry = WorkerRegistry(redis, prefix, ttl_s=3.0)
        await registry.refresh()
        assert [w.worker_id for w in registry.live("decode")] == ["d1"]
        assert [w.worker_id for w in registry.live("prefill")] == ["p1"]
        assert registry.get("old") is None and registry.get("junk") is None
        await registry.close()


async def test_departures_resolve_wait_gone_and_close_channels() -> None:
    async with redis_prefix() as (redis, prefix):
        await redis.set(worker_key(prefix, "d1"), entry("d1", port=7), ex=5)
        registry = WorkerRegistry(redis, prefix, ttl_s=3.0, refresh_interval_s=0.05)
        await registry.start()
        channel = registry.channel("127.0.0.1:7")
        assert registry.channel("127.0.0.1:7") is channel
        gone = asyncio.create_task(registry.wait_gone("d1"))
        await asyncio.sleep(0.1)
        assert not gone.done()
        await redis.delete(worker_key(prefix, "d1"))
        await asyncio.wait_for(gone, 1.0)
        assert registry.live("decode") == []
        assert registry.channel("127.0.0.1:7") is not channel
        await registry.wait_gone("never-seen")
        await registry.close()


async def test_an_entry_expires_by_its_heartbeat_between_refreshes() -> None:
    async with redis_prefix() as (redis, prefix):
        await redis.set(worker_key(prefix, "d1"), entry("d1", age_s=0.7), ex=5)
        registry = WorkerRegistry(redis, prefix, ttl_s=1.0)
        await registry.refresh()
        assert registry.get("d1") is not None
        await asyncio.sleep(0.4)
        assert registry.get("d1") is None and registry.workers() == []
        await registry.close()
