"""The TCP wire format of KV transfers (a fixed struct prefix, a small JSON header, raw bytes) and its connection.

One frame::

    offset 0        4      5                9                        17            17+H            17+H+P
           | magic  | type | header len H   | payload len P          | JSON header | payload        |
           | "SKV1" | u8   | u32, big-endian | u64, big-endian       | utf-8       | raw KV bytes   |

    CHUNK  {request_id, start, num_tokens, layout}   P = num_tokens * layout.bytes_per_token()
    END    {request_id, first_token, num_tokens}     P = 0      prefill -> decode
    ACK    {request_id, ok, error}                   P = 0      decode -> prefill
    ABORT  {request_id, reason}                      P = 0      either way

The payload of a CHUNK is the tensor ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` in
C order, as the bytes of its dtype (bfloat16 too: it travels as uint8).
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import struct
from typing import Any

import torch

from kvtransfer.layout import KVLayout

MAGIC = b"SKV1"
PREFIX = struct.Struct("!4sBIQ")
MAX_HEADER_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1 << 34
READ_PIECE_BYTES = 1 << 20
WRITE_PIECE_BYTES = 1 << 20


class MsgType(enum.IntEnum):
    CHUNK = 1
    END = 2
    ACK = 3
    ABORT = 4


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this format; the connection is closed."""


def encode_head(kind: MsgType, header: dict[str, Any], payload_len: int = 0) -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, kind, len(body), payload_len) + body


async def read_head(reader: asyncio.StreamReader) -> tuple[MsgType, dict[str, Any], int]:
    """The next frame's type, JSON header and payload length; the payload is left unread."""
    magic, kind, header_len, payload_len = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if kind not in MsgType.__members__.values():
        raise ProtocolError(f"unknown message type {kind}")
    if header_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"frame too large: header {header_len} bytes, payload {payload_len} bytes")
    try:
        header = json.loads(await reader.readexactly(header_len))
    except ValueError as e:
        raise ProtocolError(f"bad JSON header: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    return MsgType(kind), header, payload_len


def field(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``header[name]`` if it is of ``kind``, else ProtocolError."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"header field {name!r} is missing or of the wrong type: {value!r}")
    return value


async def read_payload(reader: asyncio.StreamReader, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    for offset in range(0, nbytes, READ_PIECE_BYTES):
        end = min(offset + READ_PIECE_BYTES, nbytes)
        view[offset:end] = await reader.readexactly(end - offset)
    return buf


async def skip_payload(reader: asyncio.StreamReader, nbytes: int) -> None:
    for offset in range(0, nbytes, READ_PIECE_BYTES):
        await reader.readexactly(min(READ_PIECE_BYTES, nbytes - offset))


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return kv.reshape(-1).view(torch.uint8).numpy().data


def bytes_tensor(buf: bytearray, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    """The tensor ``layout.shape(num_tokens)`` that shares memory with ``buf``."""
    return torch.frombuffer(buf, dtype=torch.uint8).view(layout.torch_dtype).reshape(layout.shape(num_tokens))


class Connection:
    """One TCP connection. Frames go out whole: a payload is written in pieces under a lock, and a
    small frame posted meanwhile waits its turn, so requests multiplexed on it never interleave
    bytes. Frames come in through ``reader``, read by the owner's task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self.reader, self.writer, self.name = reader, writer, name
        self._lock = asyncio.Lock()
        self._posting: set[asyncio.Task[None]] = set()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # drain() returns only once the kernel has every byte: the caller may then reuse its tensor.
        writer.transport.set_write_buffer_limits(high=0)

    async def send(self, kind: MsgType, header: dict[str, Any], payload: memoryview | None = None) -> None:
        """Write one frame; returns once the kernel has it. Cancelled halfway, it closes the connection."""
        async with self._lock:
            self._check_open()
            view = memoryview(b"") if payload is None else payload
            self.writer.write(encode_head(kind, header, view.nbytes))
            try:
                for offset in range(0, view.nbytes, WRITE_PIECE_BYTES):
                    self.writer.write(view[offset : offset + WRITE_PIECE_BYTES])
                    await self.writer.drain()
                await self.writer.drain()
            except BaseException:
                self.close()
                raise

    def post(self, kind: MsgType, header: dict[str, Any]) -> None:
        """Send a small frame without waiting, best effort: now if no frame is being written, else after it."""
        if self.writer.is_closing():
            return
        if not self._lock.locked():
            self.writer.write(encode_head(kind, header))
            return
        task = asyncio.ensure_future(self.send(kind, header))
        self._posting.add(task)
        task.add_done_callback(self._posted)

    def _posted(self, task: asyncio.Task[None]) -> None:
        self._posting.discard(task)
        if not task.cancelled():
            task.exception()

    def _check_open(self) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError(f"connection {self.name} is closed")

    def close(self) -> None:
        """Drop what is still buffered here (the kernel still delivers what it has) and close."""
        self.writer.transport.abort()
