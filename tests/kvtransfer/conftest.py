"""Fixtures for the kvtransfer tests: both transports, a runner with a deadline, KV with every bit pattern."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvtransfer import Destination, KVLayout, TransferError, Transport, make_transport

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class Sink:
    """The decode side's write callback, into one dense tensor, recording every call."""

    def __init__(self, layout: KVLayout, num_tokens: int) -> None:
        self.kv = torch.zeros(layout.shape(num_tokens), dtype=layout.torch_dtype)
        self.calls: list[tuple[int, int]] = []

    def write(self, start: int, kv: torch.Tensor) -> None:
        self.calls.append((start, kv.shape[2]))
        self.kv[:, :, start : start + kv.shape[2]] = kv


def random_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Random bits, NaNs and infinities included, so that equality means bit-for-bit."""
    int_dtype = INT_OF[layout.torch_dtype]
    info = torch.iinfo(int_dtype)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(info.min, info.max, layout.shape(num_tokens), dtype=int_dtype, generator=gen)
    return bits.view(layout.torch_dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(INT_OF[a.dtype]), b.view(INT_OF[b.dtype]))


@pytest.fixture(params=["tcp", "local"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run() -> Callable[..., Any]:
    """run(coroutine, timeout_s=10): asyncio.run under a deadline, so no test can hang."""

    def run(coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        return asyncio.run(asyncio.wait_for(coro, timeout_s))

    return run


@pytest.fixture
def pair(kind: str) -> Callable[..., AbstractAsyncContextManager[tuple[Transport, Transport, str]]]:
    """``async with pair(**kw) as (decode, prefill, endpoint)``: two transports of ``kind``, closed after."""

    @asynccontextmanager
    async def pair(**kw: Any) -> AsyncIterator[tuple[Transport, Transport, str]]:
        decode, prefill = make_transport(kind, **kw), make_transport(kind, **kw)
        endpoint = await decode.start_server()
        try:
            yield decode, prefill, endpoint
        finally:
            await prefill.close()
            await decode.close()

    return pair


def dest(endpoint: str, num_tokens: int, request_id: str = "r", layout: KVLayout = LAYOUT) -> Destination:
    return Destination(request_id, "d0", endpoint, (0, 1), num_tokens, layout)


def ones(num_tokens: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    return torch.ones(layout.shape(num_tokens), dtype=layout.torch_dtype)


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds until ``condition()`` holds; fails the test past ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def send_refusable(sender: Any, start: int, kv: torch.Tensor) -> None:
    """Send; a refusal may already have come back while the send was finishing, which is fine."""
    with contextlib.suppress(TransferError):
        await sender.send(start, kv)


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (they cannot import conftest)."""
    return SimpleNamespace(
        LAYOUT=LAYOUT,
        Sink=Sink,
        random=random_kv,
        same_bits=same_bits,
        dest=dest,
        ones=ones,
        until=until,
        send_refusable=send_refusable,
    )
