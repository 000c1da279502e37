"""Dead peers, dropped connections and deadlines end transfers promptly, on both sides, leaving nothing behind."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest

from kvtransfer import LocalTransport, TcpTransport, TransferError, TransferState, TransferTimeout


def test_receiver_timeout_fails_clearly_and_forgets(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, _, _):
            receiver = decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            start = time.monotonic()
            result = await receiver.wait(timeout_s=0.1)
            assert time.monotonic() - start < 1.0
            assert result.state is TransferState.FAILED and receiver.poll() is TransferState.FAILED
            assert "timed out after 0.1 s" in str(result.error) and "0 of 4 tokens" in str(result.error)
            assert decode.num_active == 0

    run(body())


def test_receiver_timeout_tells_the_connected_sender(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 8, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 8), kit.LAYOUT)
            await sender.send(0, kit.ones(4))
            assert (await receiver.wait(timeout_s=0.1)).state is TransferState.FAILED
            await kit.until(lambda: sender.poll() is TransferState.FAILED)
            result = await sender.finish(None, timeout_s=5)
            assert "aborted by the decode worker" in str(result.error) and "timed out" in str(result.error)
            assert decode.num_active == prefill.num_active == 0

    run(body())


def test_sender_to_a_dead_endpoint_fails_fast(kind: str, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        if kind == "tcp":
            transport: Any = TcpTransport()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                endpoint = f"127.0.0.1:{s.getsockname()[1]}"
        else:
            transport, endpoint = LocalTransport(), "local://nobody-serves-this"
        start = time.monotonic()
        with pytest.raises(TransferError, match=f"cannot connect to KV endpoint {endpoint}"):
            await transport.open_sender(kit.dest(endpoint, 4), kit.LAYOUT)
        assert time.monotonic() - start < 1.0
        assert transport.num_active == 0
        await transport.close()

    run(body())


def test_closing_the_receiver_mid_transfer_fails_every_sender_promptly(
    pair: Any, run: Any, kit: SimpleNamespace
) -> None:
    async def body() -> None:
        async with pair(io_timeout_s=30) as (decode, prefill, endpoint):
            senders = []
            for rid in ("a", "b"):
                decode.expect(rid, kit.LAYOUT, 100, lambda s, kv: None)
                senders.append(await prefill.open_sender(kit.dest(endpoint, 100, request_id=rid), kit.LAYOUT))
                await senders[-1].send(0, kit.ones(50))
            await decode.close()
            assert await kit.until(lambda: all(s.poll() is TransferState.FAILED for s in senders)) < 1.0
            with pytest.raises(TransferError):
                await senders[0].send(50, kit.ones(50))
            result = await senders[1].finish(0, timeout_s=30)
            assert result.state is TransferState.FAILED and result.error
            assert prefill.num_active == 0

    run(body())


# A stand-in decode server in its own process: accepts one connection and reads until killed. The
# sender sees nothing but the socket, so this is all a receiver looks like to it (and needs no torch).
READER_SCRIPT = """
import socket
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while conn.recv(1 << 20):
    pass
"""


def test_killing_the_receiver_process_fails_the_sender_promptly(run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", READER_SCRIPT, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            endpoint = f"127.0.0.1:{int(await asyncio.wait_for(proc.stdout.readline(), 5))}"
            prefill = TcpTransport(io_timeout_s=30)
            sender = await prefill.open_sender(kit.dest(endpoint, 100), kit.LAYOUT)
            await sender.send(0, kit.ones(50))
            proc.kill()
            assert await kit.until(lambda: sender.poll() is TransferState.FAILED) < 1.0
            result = await sender.finish(0, timeout_s=30)
            assert result.state is TransferState.FAILED
            assert "lost" in str(result.error) and endpoint in str(result.error)
            assert prefill.num_active == 0
            await prefill.close()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    run(body())


def test_closing_the_sender_mid_transfer_fails_every_receiver_promptly(
    pair: Any, run: Any, kit: SimpleNamespace
) -> None:
    async def body() -> None:
        async with pair() as (decode, prefill, endpoint):
            receivers = [decode.expect(rid, kit.LAYOUT, 100, lambda s, kv: None) for rid in ("a", "b")]
            for rid in ("a", "b"):
                sender = await prefill.open_sender(kit.dest(endpoint, 100, request_id=rid), kit.LAYOUT)
                await sender.send(0, kit.ones(50))
            await kit.until(lambda: all(r.poll() is TransferState.TRANSFERRING for r in receivers))
            await prefill.close()
            start = time.monotonic()
            results = await asyncio.gather(*(r.wait(timeout_s=30) for r in receivers))
            assert time.monotonic() - start < 1.0
            assert all(r.state is TransferState.FAILED and "lost" in r.error for r in results)
            assert decode.num_active == 0

    run(body())


def test_idle_connections_close_and_reopen(run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        decode, prefill = TcpTransport(), TcpTransport(idle_timeout_s=0.1)
        endpoint = await decode.start_server()
        for rid in ("first", "second"):
            receiver = decode.expect(rid, kit.LAYOUT, 4, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 4, request_id=rid), kit.LAYOUT)
            await sender.send(0, kit.ones(4))
            assert (await sender.finish(None, 5)).ok and (await receiver.wait(5)).ok
            assert prefill.num_connections == 1
            await kit.until(lambda: prefill.num_connections == 0 and decode.num_connections == 0)
        await prefill.close()
        await decode.close()

    run(body())


def test_transfer_deadline_forgets_an_unwaited_receiver(pair: Any, run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        async with pair(transfer_timeout_s=0.1) as (decode, prefill, endpoint):
            receiver = decode.expect("r", kit.LAYOUT, 4, lambda s, kv: None)
            sender = await prefill.open_sender(kit.dest(endpoint, 8, request_id="other"), kit.LAYOUT)
            await kit.until(lambda: decode.num_active == 0 and prefill.num_active == 0)
            assert "transfer deadline of 0.1 s passed" in str((await receiver.wait(1)).error)
            assert "transfer deadline" in str((await sender.finish(None, 1)).error)

    run(body())


def test_local_hooks_fail_and_delay(run: Any, kit: SimpleNamespace) -> None:
    async def body() -> None:
        decode, prefill = LocalTransport(), LocalTransport(io_timeout_s=0.1)
        endpoint = await decode.start_server()
        receiver = decode.expect("r", kit.LAYOUT, 8, lambda s, kv: None)
        sender = await prefill.open_sender(kit.dest(endpoint, 8), kit.LAYOUT)
        await sender.send(0, kit.ones(4))
        prefill.fail_next_send = True
        with pytest.raises(TransferError, match="injected failure"):
            await sender.send(4, kit.ones(4))
        assert "lost" in str((await receiver.wait(1)).error) and not prefill.fail_next_send
        receiver = decode.expect("slow", kit.LAYOUT, 8, lambda s, kv: None)
        sender = await prefill.open_sender(kit.dest(endpoint, 8, request_id="slow"), kit.LAYOUT)
        prefill.delay_s = 0.3
        with pytest.raises(TransferTimeout, match="timed out after 0.1 s"):
            await sender.send(0, kit.ones(8))
        assert "aborted by the prefill worker" in str((await receiver.wait(2)).error)
        prefill.delay_s, decode.delay_s = 0.0, 0.3
        decode.expect("late-ack", kit.LAYOUT, 8, lambda s, kv: None)
        sender = await prefill.open_sender(kit.dest(endpoint, 8, request_id="late-ack"), kit.LAYOUT)
        await sender.send(0, kit.ones(8))
        assert "no acknowledgement from the decode worker within 0.1 s" in str((await sender.finish(1, 0.1)).error)
        await asyncio.sleep(0.35)
        assert decode.num_active == prefill.num_active == 0
        await prefill.close()
        await decode.close()

    run(body())
