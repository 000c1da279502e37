"""Where a request's KV goes (Destination) and the store, Redis or in memory, through which decode tells prefill."""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any

import redis.asyncio

from kvtransfer.base import TransferTimeout
from kvtransfer.layout import KVLayout

POLL_FIRST_S = 0.005
POLL_MAX_S = 0.05


@dataclass(frozen=True)
class Destination:
    """What a decode worker publishes for one request once it has allocated the blocks.

    ``block_ids`` are the decode side's own blocks, for its bookkeeping and for transports that
    write blocks directly; the TCP wire format is token-ranged and ignores them.
    """

    request_id: str
    decode_worker_id: str
    kv_endpoint: str
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: KVLayout

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(int(b) for b in self.block_ids))
        for name in ("request_id", "decode_worker_id", "kv_endpoint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Destination.{name} must be a string, got {getattr(self, name)!r}")
        if not self.request_id or not self.kv_endpoint:
            raise ValueError(f"Destination needs a request_id and a kv_endpoint, got {self!r}")
        if not isinstance(self.layout, KVLayout):
            raise ValueError(f"Destination.layout must be a KVLayout, got {self.layout!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ValueError(f"Destination.num_tokens must be an int >= 0, got {self.num_tokens!r}")

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["block_ids"] = list(self.block_ids)
        data["layout"] = self.layout.to_dict()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Destination:
        """The inverse of ``to_json``; malformed input raises ValueError."""
        data: Any = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a Destination needs exactly the fields {sorted(names)}, got {got}")
        return cls(**{**data, "layout": KVLayout.from_dict(data["layout"])})


class MetadataStore(ABC):
    """Destinations by request id, each with a TTL so that nothing outlives a dead worker."""

    @abstractmethod
    async def publish(self, dest: Destination, ttl_s: float) -> None:
        """Store ``dest`` (replacing any earlier one) for ``ttl_s`` seconds."""

    @abstractmethod
    async def get(self, request_id: str) -> Destination | None: ...

    @abstractmethod
    async def ttl_s(self, request_id: str) -> float | None:
        """Seconds before the entry expires; None when there is none."""

    @abstractmethod
    async def delete(self, request_id: str) -> None: ...

    async def wait_for(self, request_id: str, timeout_s: float) -> Destination:
        """The destination, once published; TransferTimeout after ``timeout_s``.

        Polls ``get`` every 5 ms, backing off to 50 ms. Decode allocates and publishes before prefill
        has computed anything, so the first read nearly always hits; a poll holds no connection
        while waiting (BLPOP would hold one per waiting request), leaves the entry readable by every
        TP rank and by retries, and needs nothing beyond GET/SET with a TTL.
        """
        try:
            return await asyncio.wait_for(self._poll(request_id), timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"no KV destination for request {request_id!r} after {timeout_s:g} s "
                "(the decode worker has not allocated it, or it died)"
            ) from None

    async def _poll(self, request_id: str) -> Destination:
        delay = POLL_FIRST_S
        while (dest := await self.get(request_id)) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
        return dest


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")


class RedisMetadataStore(MetadataStore):
    """Destinations at ``{prefix}:kv:{request_id}`` as JSON strings with a millisecond TTL."""

    def __init__(self, redis_client: redis.asyncio.Redis, prefix: str = "splitserve") -> None:
        self._redis = redis_client
        self._prefix = prefix

    def key(self, request_id: str) -> str:
        return f"{self._prefix}:kv:{request_id}"

    async def publish(self, dest: Destination, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        await self._redis.set(self.key(dest.request_id), dest.to_json(), px=max(1, round(ttl_s * 1000)))

    async def get(self, request_id: str) -> Destination | None:
        raw = await self._redis.get(self.key(request_id))
        return None if raw is None else Destination.from_json(raw)

    async def ttl_s(self, request_id: str) -> float | None:
        ms = await self._redis.pttl(self.key(request_id))
        return None if ms < 0 else ms / 1000

    async def delete(self, request_id: str) -> None:
        await self._redis.delete(self.key(request_id))


class InMemoryMetadataStore(MetadataStore):
    """The same behaviour in one process, for tests; expiry by the monotonic clock."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Destination, float]] = {}

    async def publish(self, dest: Destination, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        self._entries[dest.request_id] = (dest, time.monotonic() + ttl_s)

    async def get(self, request_id: str) -> Destination | None:
        entry = self._live(request_id)
        return None if entry is None else entry[0]

    async def ttl_s(self, request_id: str) -> float | None:
        entry = self._live(request_id)
        return None if entry is None else entry[1] - time.monotonic()

    async def delete(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def _live(self, request_id: str) -> tuple[Destination, float] | None:
        entry = self._entries.get(request_id)
        if entry is not None and entry[1] <= time.monotonic():
            del self._entries[request_id]
            return None
        return entry
