"""Fake prefill and decode workers for gateway tests: real grpc.aio servers, a deterministic fake model,
real Redis registration with heartbeats, and an in-process stand-in for the KV transfer.

The fake model: the next token is a pure function of all previous tokens (``next_token``), so a test
knows every output without running anything, whichever worker computed which part.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from array import array
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from redis.asyncio import Redis

from gateway.registry import worker_key, worker_pattern
from gateway.server import GatewayServer, serve
from gateway.settings import GatewaySettings
from protos.splitserve.internal.v1 import worker_pb2, worker_pb2_grpc
from protos.splitserve.v1 import generation_pb2_grpc

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY_TTL_S = 2.0
HEARTBEAT_S = 0.1


def next_token(token_ids: Sequence[int], vocab_size: int) -> int:
    """The fake model: never 0 (the EOS of the test checkpoint)."""
    return 1 + zlib.crc32(array("i", token_ids).tobytes()) % (vocab_size - 1)


def expected_output(prompt: Sequence[int], max_new_tokens: int, vocab_size: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens, vocab_size))
    return tokens[len(prompt):]


@dataclass(frozen=True)
class KV:
    num_tokens: int
    first_token: int | None


class KVBus:
    """Stands in for the KV transfer: the prefill fake resolves the decode fake's slot for a request
    (with the KV's token count and the first token), or AbandonTransfer resolves it with None."""

    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], asyncio.Future[KV | None]] = {}

    def slot(self, decode_id: str, request_id: str) -> asyncio.Future[KV | None]:
        key = (decode_id, request_id)
        if key not in self._slots:
            self._slots[key] = asyncio.get_running_loop().create_future()
        return self._slots[key]

    def resolve(self, decode_id: str, request_id: str, kv: KV | None) -> bool:
        slot = self.slot(decode_id, request_id)
        if slot.done():
            return False
        slot.set_result(kv)
        return True


@dataclass
class Knobs:
    """Behaviour of a fake. Delays in seconds."""

    delay_s: float = 0.0              # prefill: compute time; decode: time per message
    first_delay_s: float = 0.0        # decode: extra wait before its first message
    tokens_per_message: int = 1       # decode
    resend_first: bool = True         # decode: stream output index 0 even when it came with the KV
    die_after: int | None = None      # decode: the server dies after this many messages (0: before the KV)
    respond_delay_s: float = 0.0      # prefill: time between the transfer and the response
    fail: bool = False                # prefill: the RPC fails with INTERNAL
    transfer_ok: bool = True          # prefill: the transfer is acknowledged
    max_model_len: int = 0            # registry entry


@dataclass
class FakeWorker:
    """One fake worker: a grpc.aio server on 127.0.0.1 and its registry entry, refreshed by heartbeats."""

    role: str
    redis: Redis
    prefix: str
    bus: KVBus
    vocab_size: int
    knobs: Knobs = field(default_factory=Knobs)
    load: worker_pb2.WorkerLoad = field(default_factory=worker_pb2.WorkerLoad)
    worker_id: str = ""
    port: int = 0
    requests: list[Any] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    cancels: list[tuple[str, float]] = field(default_factory=list)        # Cancel RPCs: (request id, time)
    interrupted: list[tuple[str, float]] = field(default_factory=list)    # handlers cancelled by the caller
    abandons: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"
        self._server: grpc.aio.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server = grpc.aio.server()
        self._add_servicer(self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        await self.beat()
        self._heartbeat = asyncio.create_task(self._beat_forever())

    def info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=self.role, address=f"127.0.0.1:{self.port}", model="fake",
            max_model_len=self.knobs.max_model_len, vocab_size=self.vocab_size, load=self.load,
            heartbeat_unix_s=time.time(),
        )

    async def beat(self) -> None:
        await self.redis.set(worker_key(self.prefix, self.worker_id), self.info().SerializeToString(),
                             px=int(KEY_TTL_S * 1000))

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def kill(self) -> None:
        """Dies as a process would: heartbeats stop (the key stays until it expires), calls fail."""
        self.stop_heartbeat()
        if self._server is not None:
            await self._server.stop(None)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self.beat()

    def _add_servicer(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def Cancel(self, request: worker_pb2.CancelRequest, context: Any) -> worker_pb2.CancelResponse:  # noqa: N802
        self.cancels.append((request.request_id, time.monotonic()))
        return worker_pb2.CancelResponse(found=True)

    async def Stats(self, request: worker_pb2.StatsRequest, context: Any) -> worker_pb2.WorkerInfo:  # noqa: N802
        return self.info()

    def cancelled(self, request_id: str) -> bool:
        """The gateway cancelled ``request_id`` here: a Cancel RPC, or the call itself."""
        return any(r == request_id for r, _ in self.cancels + self.interrupted)


class FakePrefill(FakeWorker, worker_pb2_grpc.PrefillWorkerServicer):
    def _add_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self, server)

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: Any) -> worker_pb2.PrefillResponse:  # noqa: N802
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        try:
            await asyncio.sleep(self.knobs.delay_s)
        except asyncio.CancelledError:
            self.interrupted.append((request.request_id, time.monotonic()))
            raise
        if self.knobs.fail:
            await context.abort(grpc.StatusCode.INTERNAL, "fake prefill failure")
        prompt, n = list(request.prompt_token_ids), request.num_prefill_tokens
        first = next_token(prompt, self.vocab_size) if n == len(prompt) else None
        if self.knobs.transfer_ok:
            self.bus.resolve(request.decode_worker_id, request.request_id, KV(n, first))
        await asyncio.sleep(self.knobs.respond_delay_s)
        self.completed.append(request.request_id)
        return worker_pb2.PrefillResponse(
            has_first_token=first is not None, first_token=first or 0, transfer_ok=self.knobs.transfer_ok,
            error="" if self.knobs.transfer_ok else "fake transfer failure", prefill_ms=1.5, queue_ms=0.5,
            transfer_ms=2.5, transfer_bytes=1000 * n,
        )


class FakeDecode(FakeWorker, worker_pb2_grpc.DecodeWorkerServicer):
    def _add_servicer(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)

    async def AbandonTransfer(self, request: worker_pb2.CancelRequest, context: Any) -> worker_pb2.CancelResponse:  # noqa: N802
        self.abandons.append(request.request_id)
        return worker_pb2.CancelResponse(found=self.bus.resolve(self.worker_id, request.request_id, None))

    async def Decode(  # noqa: N802
        self, request: worker_pb2.DecodeRequest, context: Any
    ) -> AsyncIterator[worker_pb2.DecodeStreamResponse]:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        try:
            async for message in self._decode(request):
                yield message
        except asyncio.CancelledError:
            self.interrupted.append((request.request_id, time.monotonic()))
            raise

    async def _decode(self, request: worker_pb2.DecodeRequest) -> AsyncIterator[worker_pb2.DecodeStreamResponse]:
        prompt, knobs = list(request.prompt_token_ids), self.knobs
        if knobs.die_after == 0:
            await self._die()
        kv = await self.bus.slot(self.worker_id, request.request_id) if request.num_remote_tokens else None
        here = len(prompt) - kv.num_tokens if kv is not None else len(prompt)
        output = expected_output(prompt, request.sampling.max_new_tokens, self.vocab_size)
        start = 1 if kv is not None and kv.first_token is not None and not knobs.resend_first else 0
        await asyncio.sleep(knobs.first_delay_s)
        for sent, index in enumerate(range(start, len(output), knobs.tokens_per_message), start=1):
            await asyncio.sleep(knobs.delay_s)
            tokens = output[index:index + knobs.tokens_per_message]
            last = index + len(tokens) == len(output)
            yield worker_pb2.DecodeStreamResponse(
                token_ids=tokens, output_index=index, finish_reason="length" if last else "",
                prefill_tokens_here=here if last else 0, kv_received=kv is not None,
                transfer_bytes=1000 * kv.num_tokens if kv is not None and last else 0,
            )
            if knobs.die_after is not None and sent >= knobs.die_after:
                await self._die()
        self.completed.append(request.request_id)

    async def _die(self) -> None:
        asyncio.get_running_loop().create_task(self.kill())
        await asyncio.sleep(30)


@dataclass
class Workers:
    """The fake workers of one test, all under one Redis prefix."""

    redis: Redis
    prefix: str
    vocab_size: int
    bus: KVBus = field(default_factory=KVBus)
    prefills: list[FakePrefill] = field(default_factory=list)
    decodes: list[FakeDecode] = field(default_factory=list)

    async def add(self, role: str, knobs: Knobs | None = None, load: worker_pb2.WorkerLoad | None = None) -> Any:
        """Starts and registers one more fake worker (the gateway sees it after its next refresh)."""
        if role == "prefill":
            worker: FakeWorker = FakePrefill(role, self.redis, self.prefix, self.bus, self.vocab_size,
                                             knobs or Knobs(), load or worker_pb2.WorkerLoad())
            self.prefills.append(worker)  # type: ignore[arg-type]
        else:
            worker = FakeDecode(role, self.redis, self.prefix, self.bus, self.vocab_size, knobs or Knobs(),
                                load or worker_pb2.WorkerLoad())
            self.decodes.append(worker)  # type: ignore[arg-type]
        await worker.start()
        return worker

    async def close(self) -> None:
        for worker in self.prefills + self.decodes:
            await worker.kill()
        keys = [k async for k in self.redis.scan_iter(match=worker_pattern(self.prefix))]
        if keys:
            await self.redis.delete(*keys)


@dataclass
class Cluster(Workers):
    """Fake workers plus a gateway in front of them and a client stub for it."""

    gateway: GatewayServer = None  # type: ignore[assignment]
    channel: grpc.aio.Channel = None
    stub: generation_pb2_grpc.GenerationStub = None


@asynccontextmanager
async def cluster(
    model_dir: Path,
    vocab_size: int,
    prefill: Sequence[Knobs] | None = None,
    decode: Sequence[Knobs] | None = None,
    **settings: Any,
) -> AsyncIterator[Cluster]:
    """Fake workers (one per Knobs; one of each by default) under a fresh Redis prefix, then a gateway on a free port.

    Fails (does not skip) when Redis is unreachable. Everything is stopped and every key deleted after.
    """
    redis = Redis.from_url(REDIS_URL)
    await redis.ping()
    c = Cluster(redis, f"test-{uuid.uuid4().hex}", vocab_size)
    try:
        for knobs in [Knobs()] if prefill is None else prefill:
            await c.add("prefill", knobs)
        for knobs in [Knobs()] if decode is None else decode:
            await c.add("decode", knobs)
        options = dict(model=model_dir, redis_url=REDIS_URL, host="127.0.0.1", port=0, prefix=c.prefix,
                       short_prompt_threshold=4, worker_ttl_s=1.0, registry_refresh_s=0.1)
        c.gateway = await serve(GatewaySettings(**{**options, **settings}))
        c.channel = grpc.aio.insecure_channel(f"127.0.0.1:{c.gateway.port}")
        c.stub = generation_pb2_grpc.GenerationStub(c.channel)
        yield c
    finally:
        if c.channel is not None:
            await c.channel.close()
        if c.gateway is not None:
            await c.gateway.stop(grace_s=0)
        await c.close()
        await redis.aclose()
