"""The small public Python client of a splitserve gateway: `Client` (blocking) and `AsyncClient` (asyncio).

    from splitserve.client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("The quick brown fox", max_new_tokens=16).text)

Errors: every failed call raises ``grpc.RpcError`` (for ``AsyncClient``: ``grpc.aio.AioRpcError``,
a subclass); ``err.code()`` is a ``grpc.StatusCode``: INVALID_ARGUMENT for a request the gateway
refuses, DEADLINE_EXCEEDED when ``timeout`` runs out, RESOURCE_EXHAUSTED when the gateway is full,
UNAVAILABLE when it cannot be reached or has no live worker. Nothing is retried here.

This module imports grpc and the generated stubs only (no torch).
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from protos.splitserve.v1 import generation_pb2, generation_pb2_grpc

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class GenerateResult:
    """One finished request. ``usage`` and ``timings`` hold the proto's fields by name (times in ms)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]
    prefill_worker: str
    decode_worker: str
    request_id: str = ""


@dataclass(frozen=True)
class StreamChunk:
    """The new tokens of one stream message. Only the last chunk has ``finish_reason`` (others: None),
    ``usage``, ``timings`` and the worker ids."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    request_id: str = ""
    usage: dict[str, int] | None = None
    timings: dict[str, float] | None = None
    prefill_worker: str = ""
    decode_worker: str = ""


def build_request(
    prompt: Prompt, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float | None = None,
    top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
    request_id: str = "",
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; ``top_p`` and ``seed`` are set only when given.

    A ``str`` prompt goes to ``prompt`` (the gateway tokenizes it), a sequence of ints to
    ``prompt_token_ids``. Values are checked by the gateway, not here.
    """
    if isinstance(stop, str):
        raise TypeError("stop must be a sequence of strings, not one string")
    sampling = generation_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, stop=list(stop), ignore_eos=ignore_eos,
    )
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = generation_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, Iterable) and not isinstance(prompt, bytes | Mapping):
        request.prompt_token_ids.extend(operator.index(t) for t in prompt)
    else:
        raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
    return request


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def result_from_proto(response: generation_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=response.text, token_ids=list(response.token_ids), finish_reason=response.finish_reason,
        usage=_fields(response.usage), timings=_fields(response.timings), prefill_worker=response.prefill_worker,
        decode_worker=response.decode_worker, request_id=response.request_id,
    )


def chunk_from_proto(message: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        token_ids=list(message.token_ids), text=message.text, finish_reason=message.finish_reason or None,
        request_id=message.request_id,
        usage=_fields(message.usage) if message.HasField("usage") else None,
        timings=_fields(message.timings) if message.HasField("timings") else None,
        prefill_worker=message.prefill_worker, decode_worker=message.decode_worker,
    )


class _Base:
    def __init__(self, address: str, timeout: float | None) -> None:
        self.address, self.timeout = address, timeout

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """A blocking client over one gRPC channel; thread-safe. ``timeout`` (seconds) is the default
    deadline of every call, overridden per call; None = no deadline."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        super().__init__(address, timeout)
        self._channel = grpc.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def generate(
        self, prompt: Prompt, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float | None = None,
        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
        request_id: str = "", timeout: float | None = None,
    ) -> GenerateResult:
        """Runs one request to completion. Raises ``grpc.RpcError`` on failure."""
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, request_id=request_id)
        return result_from_proto(self._stub.Generate(request, timeout=self._timeout(timeout)))

    def stream(
        self, prompt: Prompt, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float | None = None,
        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
        request_id: str = "", timeout: float | None = None,
    ) -> Iterator[StreamChunk]:
        """Yields the new tokens as they come. Leaving the loop early (or closing the iterator)
        cancels the request. Raises ``grpc.RpcError`` on failure, while iterating."""
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, request_id=request_id)
        return self._iterate(self._stub.GenerateStream(request, timeout=self._timeout(timeout)))

    @staticmethod
    def _iterate(call: Any) -> Iterator[StreamChunk]:
        try:
            for message in call:
                yield chunk_from_proto(message)
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client` (grpc.aio). Create it inside a running event loop and use it there."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        super().__init__(address, timeout)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def generate(
        self, prompt: Prompt, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float | None = None,
        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
        request_id: str = "", timeout: float | None = None,
    ) -> GenerateResult:
        """Runs one request to completion. Raises ``grpc.aio.AioRpcError`` (a ``grpc.RpcError``) on failure."""
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, request_id=request_id)
        return result_from_proto(await self._stub.Generate(request, timeout=self._timeout(timeout)))

    async def stream(
        self, prompt: Prompt, *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float | None = None,
        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False,
        request_id: str = "", timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """``async for chunk in client.stream(...)``; leaving the loop early cancels the request."""
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, request_id=request_id)
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout))
        try:
            async for message in call:
                yield chunk_from_proto(message)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
