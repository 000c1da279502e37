"""Destination JSON, and the metadata stores (a real Redis on 127.0.0.1:6379 and the in-memory one) behaving alike."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from kvtransfer import Destination, InMemoryMetadataStore, KVLayout, MetadataStore, RedisMetadataStore, TransferTimeout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, dtype="float16", tp_rank=0, tp_size=1)


def destination(request_id: str = "req-1", num_tokens: int = 40) -> Destination:
    return Destination(request_id, "decode-0", "10.0.0.2:7000", (9, 4, 7), num_tokens, LAYOUT)


@given(
    request_id=st.text(min_size=1, max_size=20),
    block_ids=st.lists(st.integers(0, 2**31)),
    num_tokens=st.integers(0, 10**6),
)
def test_destination_json_round_trip(request_id: str, block_ids: list[int], num_tokens: int) -> None:
    dest = Destination(request_id, "decode-0", "host:1", block_ids, num_tokens, LAYOUT)  # type: ignore[arg-type]
    assert dest.block_ids == tuple(block_ids)
    assert Destination.from_json(dest.to_json()) == dest
    assert Destination.from_json(dest.to_json().encode()) == dest


@pytest.mark.parametrize(
    "text",
    ['{"request_id": "r"}', "[1]", destination().to_json().replace('"num_tokens":40', '"num_tokens":-1')],
)
def test_destination_refuses_bad_json(text: str) -> None:
    with pytest.raises(ValueError):
        Destination.from_json(text)


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> Callable[[], AbstractAsyncContextManager[MetadataStore]]:
    """``async with store() as s``: a store; for Redis, under a fresh prefix whose keys are deleted after.

    Redis must be reachable at 127.0.0.1:6379: the test fails, not skips, when it is not (CI has one).
    """

    @asynccontextmanager
    async def make() -> AsyncIterator[MetadataStore]:
        if request.param == "memory":
            yield InMemoryMetadataStore()
            return
        client = redis.asyncio.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
        prefix = f"splitserve-test-{uuid.uuid4().hex}"
        try:
            assert await client.ping(), "Redis at 127.0.0.1:6379 did not answer PING"  # type: ignore[misc]
            yield RedisMetadataStore(client, prefix=prefix)
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    return make


def test_publish_then_wait_for(store: Any, run: Any) -> None:
    async def body() -> None:
        async with store() as s:
            assert await s.get("req-1") is None
            await s.publish(destination(), ttl_s=30)
            assert await s.get("req-1") == destination()
            assert await s.wait_for("req-1", timeout_s=1) == destination()
            await s.publish(destination(num_tokens=0), ttl_s=30)
            assert (await s.wait_for("req-1", timeout_s=1)).num_tokens == 0

    run(body())


def test_wait_for_sees_a_later_publish(store: Any, run: Any) -> None:
    async def body() -> None:
        async with store() as s:

            async def publish_later() -> None:
                await asyncio.sleep(0.1)
                await s.publish(destination("late"), ttl_s=30)

            task = asyncio.ensure_future(publish_later())
            start = time.monotonic()
            assert (await s.wait_for("late", timeout_s=5)).request_id == "late"
            assert 0.09 < time.monotonic() - start < 1.0
            await task

    run(body())


def test_wait_for_times_out(store: Any, run: Any) -> None:
    async def body() -> None:
        async with store() as s:
            start = time.monotonic()
            with pytest.raises(TransferTimeout, match="no KV destination for request 'missing' after 0.15 s"):
                await s.wait_for("missing", timeout_s=0.15)
            assert time.monotonic() - start < 1.0

    run(body())


def test_entries_have_a_ttl_and_expire(store: Any, run: Any) -> None:
    async def body() -> None:
        async with store() as s:
            await s.publish(destination("long"), ttl_s=30)
            assert 29 < await s.ttl_s("long") <= 30
            await s.publish(destination("short"), ttl_s=0.1)
            await asyncio.sleep(0.25)
            assert await s.get("short") is None and await s.ttl_s("short") is None
            with pytest.raises(ValueError, match="ttl_s must be > 0"):
                await s.publish(destination("never"), ttl_s=0)

    run(body())


def test_delete(store: Any, run: Any) -> None:
    async def body() -> None:
        async with store() as s:
            await s.publish(destination(), ttl_s=30)
            await s.delete("req-1")
            assert await s.get("req-1") is None and await s.ttl_s("req-1") is None
            await s.delete("req-1")

    run(body())


def test_redis_key_layout(run: Any) -> None:
    async def body() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=6379, decode_responses=True)
        prefix = f"splitserve-test-{uuid.uuid4().hex}"
        s = RedisMetadataStore(client, prefix=prefix)
        try:
            await s.publish(destination(), ttl_s=30)
            assert s.key("req-1") == f"{prefix}:kv:req-1"
            assert Destination.from_json(await client.get(f"{prefix}:kv:req-1")) == destination()
            assert 0 < await client.pttl(f"{prefix}:kv:req-1") <= 30_000
            assert await s.get("req-1") == destination()
        finally:
            await client.delete(f"{prefix}:kv:req-1")
            await client.aclose()

    run(body())
