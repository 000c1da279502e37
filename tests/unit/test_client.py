"""splitserve.client against an in-process fake Generation servicer: request and result mapping,
streaming, errors, deadlines, sync and async."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from protos.splitserve.v1 import generation_pb2 as pb
from protos.splitserve.v1 import generation_pb2_grpc
from splitserve.client import AsyncClient, Client, GenerateResult, StreamChunk

ROOT = Path(__file__).resolve().parents[2]


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Echoes prompt tokens + 1. request_id picks a behaviour: "slow" sleeps, "bad" fails, "endless" streams on."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.stream_cancelled = threading.Event()

    async def _receive(self, request: pb.GenerateRequest, context: Any) -> None:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if request.request_id == "slow":
            await asyncio.sleep(5)
        if request.request_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be >= 1")

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        await self._receive(request, context)
        tokens = [t + 1 for t in request.prompt_token_ids] or [len(request.prompt)]
        return pb.GenerateResponse(
            request_id=request.request_id or "minted", text="héllo", token_ids=tokens, finish_reason="length",
            usage=pb.Usage(prompt_tokens=3, completion_tokens=len(tokens), prefill_tokens_on_prefill_worker=2,
                           prefill_tokens_on_decode_worker=1),
            timings=pb.Timings(ttft_ms=1.5, tpot_ms=0.25, transfer_bytes=4096),
            prefill_worker="prefill-0", decode_worker="decode-1",
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self._receive(request, context)
        try:
            for i in range(10**6 if request.request_id == "endless" else 3):
                yield pb.GenerateStreamResponse(request_id="r", token_ids=[10 + i], text=f"t{i}")
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise
        yield pb.GenerateStreamResponse(
            request_id="r", finish_reason="stop", usage=pb.Usage(prompt_tokens=2, completion_tokens=3),
            timings=pb.Timings(e2e_ms=9.0), prefill_worker="prefill-0", decode_worker="decode-0",
        )


@pytest.fixture
def fake() -> Iterator[tuple[FakeGeneration, str]]:
    """The fake servicer and its address; its grpc.aio server runs on an event loop in a thread."""
    servicer, loop = FakeGeneration(), asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield servicer, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


# -- request mapping -----------------------------------------------------------------------------
def test_token_prompt_and_defaults_leave_optional_fields_unset(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address) as client:
        client.generate([1, 2, 3])
    (request,) = servicer.requests
    assert list(request.prompt_token_ids) == [1, 2, 3] and request.prompt == "" and request.request_id == ""
    s = request.sampling
    assert s.HasField("max_new_tokens") and s.max_new_tokens == 16
    assert not s.HasField("top_p") and not s.HasField("seed")
    assert (s.temperature, s.top_k, list(s.stop), s.ignore_eos) == (0.0, 0, [], False)


def test_every_argument_reaches_the_request(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address) as client:
        client.generate("hi there", max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=0,
                        stop=("\n", "END"), ignore_eos=True, request_id="req-1")
    (request,) = servicer.requests
    assert request.prompt == "hi there" and not request.prompt_token_ids and request.request_id == "req-1"
    s = request.sampling
    assert s.max_new_tokens == 5 and s.temperature == pytest.approx(0.7) and s.top_k == 40
    assert s.HasField("top_p") and s.top_p == pytest.approx(0.9)
    assert s.HasField("seed") and s.seed == 0  # a falsy seed is still "given"
    assert list(s.stop) == ["\n", "END"] and s.ignore_eos


@pytest.mark.parametrize("prompt", [{"a": 1}, b"bytes", 3, ["1", "2"]])
def test_a_prompt_that_is_neither_text_nor_token_ids_is_refused(prompt: Any) -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError):
        client.generate(prompt)


def test_a_single_stop_string_is_refused() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(TypeError, match="stop"):
        client.generate("x", stop="END")  # type: ignore[arg-type]


# -- results and streams -------------------------------------------------------------------------
def test_result_mapping(fake: tuple[FakeGeneration, str]) -> None:
    _, address = fake
    with Client(address) as client:
        result = client.generate((7, 8), request_id="abc")
    assert result == GenerateResult(
        text="héllo", token_ids=[8, 9], finish_reason="length",
        usage={"prompt_tokens": 3, "completion_tokens": 2, "prefill_tokens_on_prefill_worker": 2,
               "prefill_tokens_on_decode_worker": 1},
        timings={"queue_ms": 0.0, "prefill_ms": 0.0, "transfer_ms": 0.0, "transfer_bytes": 4096, "ttft_ms": 1.5,
                 "tpot_ms": 0.25, "e2e_ms": 0.0},
        prefill_worker="prefill-0", decode_worker="decode-1", request_id="abc",
    )


def test_stream_yields_new_tokens_then_the_finish(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address) as client:
        chunks = list(client.stream([5], max_new_tokens=3, seed=7))
    assert servicer.requests[0].sampling.seed == 7
    assert [c.token_ids for c in chunks] == [[10], [11], [12], []]
    assert "".join(c.text for c in chunks) == "t0t1t2"
    assert [c.finish_reason for c in chunks] == [None, None, None, "stop"]
    assert all(c.usage is None and c.timings is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage is not None and last.usage["completion_tokens"] == 3
    assert last.timings is not None and last.timings["e2e_ms"] == 9.0
    assert (last.prefill_worker, last.decode_worker) == ("prefill-0", "decode-0")


def test_leaving_a_stream_early_cancels_the_request(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address) as client:
        for chunk in client.stream([1], request_id="endless"):
            assert chunk.token_ids == [10]
            break
        assert servicer.stream_cancelled.wait(5)


# -- errors and deadlines ------------------------------------------------------------------------
def test_a_refused_request_raises_rpc_error(fake: tuple[FakeGeneration, str]) -> None:
    _, address = fake
    with Client(address) as client, pytest.raises(grpc.RpcError) as info:
        client.generate([1], request_id="bad")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in info.value.details()


def test_timeout_becomes_the_call_deadline(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address, timeout=30) as client:
        client.generate([1])
        client.generate([1], timeout=5)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.generate([1], request_id="slow", timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 3
        with pytest.raises(grpc.RpcError) as info:
            list(client.stream([1], request_id="slow", timeout=0.2))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 25 < servicer.time_remaining[0] < 31  # the client's default (gRPC rounds deadlines a little)
    assert 3 < servicer.time_remaining[1] < 6  # the call's own


def test_no_timeout_means_no_deadline(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake
    with Client(address) as client:
        client.generate([1])
    assert servicer.time_remaining == [None]


def test_an_unreachable_gateway_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(grpc.RpcError) as info:
        client.generate([1])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- AsyncClient ---------------------------------------------------------------------------------
def test_async_generate_and_stream(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake

    async def main() -> tuple[GenerateResult, list[StreamChunk]]:
        async with AsyncClient(address, timeout=30) as client:
            result = await client.generate([1, 2], top_p=0.5, stop=["x"])
            chunks = [c async for c in client.stream("hey", max_new_tokens=3)]
        return result, chunks

    result, chunks = asyncio.run(main())
    assert result.token_ids == [2, 3] and result.decode_worker == "decode-1"
    first = servicer.requests[0].sampling
    assert first.top_p == pytest.approx(0.5) and list(first.stop) == ["x"]
    assert [c.token_ids for c in chunks] == [[10], [11], [12], []] and chunks[-1].finish_reason == "stop"
    assert servicer.requests[1].prompt == "hey" and not servicer.requests[1].sampling.HasField("seed")
    assert all(r is not None and 25 < r < 31 for r in servicer.time_remaining)


def test_async_deadline_and_errors(fake: tuple[FakeGeneration, str]) -> None:
    _, address = fake

    async def main() -> list[grpc.StatusCode]:
        codes = []
        async with AsyncClient(address) as client:
            for call in (client.generate([1], request_id="slow", timeout=0.2),
                         client.generate([1], request_id="bad"),
                         _drain(client.stream([1], request_id="slow", timeout=0.2))):
                try:
                    await call
                except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
                    codes.append(e.code())
        return codes

    assert asyncio.run(main()) == [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT,
                                   grpc.StatusCode.DEADLINE_EXCEEDED]


def test_async_stream_left_early_cancels(fake: tuple[FakeGeneration, str]) -> None:
    servicer, address = fake

    async def main() -> None:
        async with AsyncClient(address) as client:
            stream = client.stream([1], request_id="endless")
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
    assert servicer.stream_cancelled.wait(5)


async def _drain(chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [c async for c in chunks]


def test_importing_the_client_loads_no_torch() -> None:
    code = ("import sys, splitserve.client, splitserve.launcher, splitserve.embedded_redis; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
