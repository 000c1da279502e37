"""The TCP wire format, spoken by hand: frame layout, a peer that breaks the protocol, garbage on the socket."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import torch

from kvtransfer import KVLayout, TcpTransport, TransferState
from kvtransfer.framing import MsgType, encode_head, read_head

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32")


def test_frame_layout() -> None:
    frame = encode_head(MsgType.END, {"request_id": "r", "first_token": 5, "num_tokens": 4})
    magic, kind, header_len, payload_len = struct.unpack("!4sBIQ", frame[:17])
    assert (magic, kind, payload_len) == (b"SKV1", 2, 0)
    assert json.loads(frame[17:]) == {"request_id": "r", "first_token": 5, "num_tokens": 4}
    assert header_len == len(frame) - 17


async def ask(endpoint: str, frames: list[bytes]) -> tuple[MsgType, dict[str, Any]]:
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    for frame in frames:
        writer.write(frame)
    kind, header, _ = await read_head(reader)
    writer.close()
    return kind, header


def test_end_before_every_token_is_refused(run: Any) -> None:
    async def body() -> None:
        decode = TcpTransport()
        endpoint = await decode.start_server()
        receiver = decode.expect("r", LAYOUT, 4, lambda s, kv: None)
        chunk = torch.zeros(LAYOUT.shape(1)).numpy().tobytes()
        header = {"request_id": "r", "start": 2, "num_tokens": 1, "layout": LAYOUT.to_dict()}
        end = {"request_id": "r", "first_token": 9, "num_tokens": 4}
        frames = [encode_head(MsgType.CHUNK, header, len(chunk)) + chunk, encode_head(MsgType.END, end)]
        kind, reply = await ask(endpoint, frames)
        assert kind is MsgType.ACK and reply["ok"] is False
        assert "END arrived before tokens [0, 2) were written" in reply["error"]
        assert receiver.poll() is TransferState.FAILED and decode.num_active == 0
        await decode.close()

    run(body())


def test_garbage_closes_only_that_connection(run: Any) -> None:
    async def body() -> None:
        decode = TcpTransport()
        endpoint = await decode.start_server()
        host, port = endpoint.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(32))
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        kind, reply = await ask(endpoint, [encode_head(MsgType.END, {"request_id": "x", "num_tokens": 1})])
        assert kind is MsgType.ACK and not reply["ok"] and "unknown request 'x'" in reply["error"]
        await decode.close()

    run(body())
