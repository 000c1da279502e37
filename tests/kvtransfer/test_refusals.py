"""Refusals (layout, unknown request, bad range, failing write) and aborts from either side, answered clearly."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kvtransfer import KVLayout, LayoutMismatch, TransferError, TransferState, make_transport


def test_layout_mismatch_is_refused_naming_the_field(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    wide = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")

    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 4, layout=wide), wide)
            await kit.send_refusable(sender, 0, kit.ones(4, wide))
            received = await receiver.wait(timeout_s=5)
            assert received.state is TransferState.FAILED and "head_dim differs: 8 here, 16" in received.error
            sent = await sender.finish(None, timeout_s=5)
            assert sent.state is TransferState.FAILED
            assert "refused" in sent.error and "head_dim" in sent.error
            assert decode.num_active == prefill.num_active == 0

    run(body())


@pytest.mark.parametrize(
    ("theirs", "field"),
    [
        (KVLayout(3, 2, 8, "float16"), "num_layers"),
        (KVLayout(2, 2, 8, "bfloat16"), "dtype"),
        (KVLayout(2, 2, 8, "float16", tp_rank=1, tp_size=2), "resharding"),
    ],
)
def test_open_sender_refuses_an_incompatible_layout(
    pair: Any, run: Any, theirs: KVLayout, field: str, kit: SimpleNamespace
) -> None:
    async def body() -> None:
        async with pair() as (_, prefill, endpoint):
            with pytest.raises(LayoutMismatch, match=field):
                await prefill.open_sender(kit.dest(endpoint, 4, layout=theirs), kit.LAYOUT)
            assert prefill.num_active == 0

    run(body())


def test_unknown_request_is_not_acknowledged(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            sender = await prefill.open_sender(kit.dest(endpoint, 4, request_id="never-expected"), kit.LAYOUT)
            await kit.send_refusable(sender, 0, kit.ones(4))
            result = await sender.finish(1, timeout_s=5)
            assert not result.ok and "unknown request 'never-expected'" in result.error
            assert decode.num_active == prefill.num_active == 0

    run(body())


def test_a_range_beyond_num_tokens_fails_the_receiver(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 8, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 16), kit.LAYOUT)
            await kit.send_refusable(sender, 8, kit.ones(8))
            received = await receiver.wait(timeout_s=5)
            assert not received.ok and "tokens [8, 16) are beyond the 8 tokens expected" in received.error
            await kit.until(lambda: sender.poll() is TransferState.FAILED)
            assert decode.num_active == prefill.num_active == 0

    run(body())


def test_abort_from_the_sender(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 8, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 8), kit.LAYOUT)
            await sender.send(0, kit.ones(4))
            sender.abort("cancelled by the client")
            assert sender.poll() is TransferState.FAILED
            received = await receiver.wait(timeout_s=5)
            assert received.error == "aborted by the prefill worker: cancelled by the client"
            with pytest.raises(TransferError, match="cancelled by the client"):
                await sender.send(4, kit.ones(4))
            assert decode.num_active == prefill.num_active == 0

    run(body())


def test_abort_from_the_receiver(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 8, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 8), kit.LAYOUT)
            await sender.send(0, kit.ones(4))
            await kit.until(lambda: receiver.poll() is TransferState.TRANSFERRING)
            receiver.abort("out of memory")
            assert receiver.poll() is TransferState.FAILED and decode.num_active == 0
            await kit.until(lambda: sender.poll() is TransferState.FAILED)
            result = await sender.finish(None, timeout_s=5)
            assert "aborted by the decode worker" in result.error and "out of memory" in result.error
            assert prefill.num_active == 0

    run(body())


def test_receiver_aborted_before_the_sender_came(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            receiver.abort("request cancelled")
            assert (await receiver.wait(1)).error == "aborted by the decode worker: request cancelled"
            sender = await prefill.open_sender(kit.dest(endpoint, 4), kit.LAYOUT)
            await kit.send_refusable(sender, 0, kit.ones(4))
            assert "unknown request" in (await sender.finish(None, timeout_s=5)).error

    run(body())


def test_finish_before_every_token_was_sent(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 10, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 10), kit.LAYOUT)
            await sender.send(0, kit.ones(3))
            await sender.send(6, kit.ones(4))
            sent = await sender.finish(5, timeout_s=5)
            assert not sent.ok and "finish() before tokens [3, 6) were sent" in sent.error
            received = await receiver.wait(timeout_s=5)
            assert not received.ok and "aborted by the prefill worker" in received.error

    run(body())


def test_a_failing_write_callback_fails_both_sides(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    def write(start: int, kv: torch.Tensor) -> None:
        raise RuntimeError("no such block")

    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 4, write)
            sender = await prefill.open_sender(kit.dest(endpoint, 4), kit.LAYOUT)
            await kit.send_refusable(sender, 0, kit.ones(4))
            received = await receiver.wait(timeout_s=5)
            assert not received.ok and "writing tokens [0, 4) failed" in received.error
            assert "no such block" in (await sender.finish(None, timeout_s=5)).error

    run(body())


def test_send_checks_shape_and_range(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 4), kit.LAYOUT)
            with pytest.raises(LayoutMismatch, match="num_kv_heads"):
                await sender.send(0, torch.zeros(2, 2, 4, 3, 8, dtype=torch.float16))
            with pytest.raises(ValueError, match=r"tokens \[2, 6\) are outside \[0, 4\)"):
                await sender.send(2, kit.ones(4))
            assert sender.poll() is TransferState.BOOTSTRAPPING
            await sender.send(0, kit.ones(4))
            assert (await sender.finish(None, 5)).ok

    run(body())


def test_expect_refuses_duplicates_and_needs_a_server(kind: str, pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        with pytest.raises(RuntimeError, match="start_server"):
            make_transport(kind).expect("r", kit.LAYOUT, 4, lambda s, kv: None)
        async with pair() as (decode, _, _):
            decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            with pytest.raises(ValueError, match="already expected"):
                decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)

    run(body())
