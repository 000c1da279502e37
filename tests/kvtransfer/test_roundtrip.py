"""Round trips over TCP and the local fake: every bit arrives, in any chunk order, many requests on one connection."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import Destination, KVLayout, TransferState

DTYPES = ["float32", "float16", "bfloat16"]


def chunks(num_tokens: int, size: int, order_seed: int | None) -> list[tuple[int, int]]:
    """(start, end) pieces of [0, num_tokens); the last one partial; shuffled unless order_seed is None."""
    pieces = [(s, min(s + size, num_tokens)) for s in range(0, num_tokens, size)]
    if order_seed is not None:
        random.Random(order_seed).shuffle(pieces)
    return pieces


async def transfer(
    ends: tuple[Any, Any, str],
    kit: SimpleNamespace,
    request_id: str,
    src: torch.Tensor,
    pieces: list[tuple[int, int]],
    first_token: int | None,
) -> tuple[Any, Any, Any]:
    """Expect on the decode end, send ``src`` in ``pieces`` from the prefill end: (sent, received, sink)."""
    (decode, prefill, endpoint), layout = ends, KVLayout.for_tensor(src)
    num_tokens = src.shape[2]
    sink = kit.Sink(layout, num_tokens)
    receiver = decode.expect(request_id, layout, num_tokens, sink.write)
    assert receiver.poll() is TransferState.BOOTSTRAPPING
    sender = await prefill.open_sender(Destination(request_id, "d0", endpoint, (3, 1, 2), num_tokens, layout), layout)
    for start, end in pieces:
        await sender.send(start, src[:, :, start:end])
        await asyncio.sleep(0)
    assert sender.poll() is TransferState.TRANSFERRING
    sent = await sender.finish(first_token, timeout_s=5)
    received = await receiver.wait(timeout_s=5)
    return sent, received, sink


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_layers=st.integers(1, 3),
    num_kv_heads=st.integers(1, 3),
    head_dim=st.integers(1, 9),
    num_tokens=st.integers(1, 67),
    chunk=st.integers(1, 70),
    order_seed=st.one_of(st.none(), st.integers(0, 1000)),
    first_token=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
)
def test_round_trip_is_bit_exact(
    pair: Any,
    run: Any,
    kit: SimpleNamespace,
    dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    num_tokens: int,
    chunk: int,
    order_seed: int | None,
    first_token: int | None,
) -> None:
    layout = KVLayout(num_layers, num_kv_heads, head_dim, dtype)
    src = kit.random(layout, num_tokens, seed=num_tokens)
    pieces = chunks(num_tokens, chunk, order_seed)

    async def body() -> None:
        async with pair() as ends:
            decode, prefill, _ = ends
            sent, received, sink = await transfer(ends, kit, "r", src, pieces, first_token)
            assert sent.state is TransferState.DONE, sent.error
            assert received.state is TransferState.DONE, received.error
            assert kit.same_bits(sink.kv, src)
            assert sorted(sink.calls) == sorted((s, e - s) for s, e in pieces)
            assert received.first_token == sent.first_token == first_token
            nbytes = num_tokens * layout.bytes_per_token()
            assert sent.bytes == received.bytes == src.numel() * src.element_size() == nbytes
            assert sent.num_tokens == received.num_tokens == num_tokens
            assert sent.seconds > 0 and received.gbps > 0 and sent.error is None and received.error is None
            assert decode.num_active == prefill.num_active == 0

    run(body())


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_out_of_order_with_partial_last_chunk(pair: Any, run: Any, kit: SimpleNamespace, dtype: str) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=5, dtype=dtype)
    src = kit.random(layout, 23)
    pieces = [(16, 23), (0, 8), (8, 16)]

    async def body() -> None:
        async with pair() as ends:
            decode, prefill, _ = ends
            sent, received, sink = await transfer(ends, kit, "r", src, pieces, 7)
            assert sent.ok and received.ok
            assert sink.calls == [(16, 7), (0, 8), (8, 8)]
            assert kit.same_bits(sink.kv, src) and received.first_token == 7

    run(body())


def test_a_range_sent_twice_counts_once(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    layout = KVLayout(1, 1, 4, "float32")
    src = kit.random(layout, 10)

    async def body() -> None:
        async with pair() as ends:
            sent, received, sink = await transfer(ends, kit, "r", src, [(0, 6), (4, 10), (0, 6)], None)
            assert sent.ok and received.ok and received.num_tokens == 10 and received.first_token is None
            assert kit.same_bits(sink.kv, src)

    run(body())


def test_concurrent_requests_share_one_connection(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16")
    sources = {f"req-{i}": kit.random(layout, 5 + 7 * i, seed=i) for i in range(8)}

    async def body() -> None:
        async with pair() as ends:
            decode, prefill, _ = ends
            jobs = [
                transfer(ends, kit, rid, src, chunks(src.shape[2], 3, i), i)
                for i, (rid, src) in enumerate(sources.items())
            ]
            results = await asyncio.gather(*jobs)
            assert prefill.num_connections == 1 and decode.num_connections == 1
            for i, ((sent, received, sink), src) in enumerate(zip(results, sources.values(), strict=True)):
                assert sent.ok and received.ok, (sent.error, received.error)
                assert kit.same_bits(sink.kv, src) and received.first_token == i
            assert decode.num_active == prefill.num_active == 0

    run(body())


def test_caller_may_reuse_its_tensor_once_send_returns(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    layout = KVLayout(4, 2, 64, "float16")
    src = kit.random(layout, 96)

    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            sink = kit.Sink(layout, 96)
            receiver = decode.expect("r", layout, 96, sink.write)
            sender = await prefill.open_sender(Destination("r", "d0", endpoint, (), 96, layout), layout)
            staging = torch.empty(layout.shape(32), dtype=layout.torch_dtype)
            for start in range(0, 96, 32):
                staging.copy_(src[:, :, start : start + 32])
                await sender.send(start, staging)
                staging.fill_(0)
            assert (await sender.finish(None, 5)).ok and (await receiver.wait(5)).ok
            assert kit.same_bits(sink.kv, src)

    run(body())


@pytest.mark.gpu
def test_gpu_tensors_are_sent_from_the_cpu(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    layout = KVLayout(2, 2, 8, "bfloat16")
    src = kit.random(layout, 9)

    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            sink = kit.Sink(layout, 9)
            receiver = decode.expect("r", layout, 9, sink.write)
            sender = await prefill.open_sender(Destination("r", "d0", endpoint, (), 9, layout), layout)
            await sender.send(0, src.cuda())
            assert (await sender.finish(1, 5)).ok and (await receiver.wait(5)).ok
            assert kit.same_bits(sink.kv, src)

    run(body())
