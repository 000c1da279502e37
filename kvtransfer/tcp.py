"""TcpTransport: KV transfers over asyncio TCP streams, one cached connection per decode endpoint."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from kvtransfer.base import KVReceiver, KVSender, TransferError, TransferTimeout, Transport, WriteFn
from kvtransfer.framing import (
    Connection,
    MsgType,
    ProtocolError,
    bytes_tensor,
    field,
    read_head,
    read_payload,
    skip_payload,
    tensor_bytes,
)
from kvtransfer.layout import KVLayout
from kvtransfer.metadata import Destination
from kvtransfer.receiver import Inbox, Peer
from kvtransfer.sender import Link, Sender

log = logging.getLogger(__name__)

STREAM_LIMIT_BYTES = 8 << 20


def _reason(e: BaseException) -> str:
    """Why a connection's read loop ended, in words; a bug (not an I/O error) is logged with its traceback."""
    if isinstance(e, asyncio.IncompleteReadError):
        return "the peer closed the connection"
    if not isinstance(e, OSError):
        log.error("KV connection failed", exc_info=e)
    return f"{type(e).__name__}: {e}"


class _TcpLink(Link):
    """Prefill side: a connection to one decode endpoint, its reader task and its idle timer."""

    def __init__(self, endpoint: str, conn: Connection, transport: TcpTransport) -> None:
        super().__init__(endpoint)
        self._conn, self._transport = conn, transport
        self._idle_timer: asyncio.TimerHandle | None = None
        self.task = asyncio.ensure_future(self._read())

    async def send_chunk(self, request_id: str, start: int, kv: torch.Tensor, layout: KVLayout) -> None:
        header = {"request_id": request_id, "start": start, "num_tokens": kv.shape[2], "layout": layout.to_dict()}
        await self._conn.send(MsgType.CHUNK, header, tensor_bytes(kv))

    async def send_end(self, request_id: str, first_token: int | None, num_tokens: int) -> None:
        end = {"request_id": request_id, "first_token": first_token, "num_tokens": num_tokens}
        await self._conn.send(MsgType.END, end)

    def send_abort(self, request_id: str, reason: str) -> None:
        self._conn.post(MsgType.ABORT, {"request_id": request_id, "reason": reason})

    def attach(self, sender: Sender) -> None:
        super().attach(sender)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def on_idle(self) -> None:
        idle_s = self._transport.idle_timeout_s
        self._idle_timer = asyncio.get_running_loop().call_later(idle_s, self.close, f"idle for {idle_s:g} s")

    def close(self, reason: str) -> None:
        self.on_lost(reason)
        self._conn.close()
        self._transport._forget_link(self)

    async def _read(self) -> None:
        reason = "closed"
        try:
            while True:
                kind, header, nbytes = await read_head(self._conn.reader)
                if nbytes or kind not in (MsgType.ACK, MsgType.ABORT):
                    raise ProtocolError(f"unexpected {kind.name} with {nbytes} payload bytes from a decode worker")
                request_id = field(header, "request_id", str)
                if kind is MsgType.ACK:
                    self.on_ack(request_id, field(header, "ok", bool), field(header, "error", (str, type(None))))
                else:
                    self.on_abort(request_id, field(header, "reason", str))
        except Exception as e:
            reason = _reason(e)
        finally:
            self.close(reason)


class _TcpPeer(Peer):
    """Decode side: a connection from one prefill worker, read frame by frame into the inbox."""

    def __init__(self, conn: Connection, inbox: Inbox) -> None:
        self._conn, self._inbox = conn, inbox

    def send_ack(self, request_id: str, ok: bool, error: str | None) -> None:
        self._conn.post(MsgType.ACK, {"request_id": request_id, "ok": ok, "error": error})

    def send_abort(self, request_id: str, reason: str) -> None:
        self._conn.post(MsgType.ABORT, {"request_id": request_id, "reason": reason})

    def close(self) -> None:
        self._conn.close()

    async def serve(self) -> None:
        reason = "closed"
        try:
            while True:
                await self._handle(*await read_head(self._conn.reader))
        except Exception as e:
            reason = _reason(e)
        finally:
            self._inbox.on_peer_lost(self, reason)
            self._conn.close()

    async def _handle(self, kind: MsgType, header: dict[str, Any], nbytes: int) -> None:
        request_id = field(header, "request_id", str)
        if kind is MsgType.CHUNK:
            start, num_tokens = field(header, "start", int), field(header, "num_tokens", int)
            receiver = self._inbox.accept_chunk(
                self, request_id, start, num_tokens, field(header, "layout", dict), nbytes
            )
            if receiver is None:
                await skip_payload(self._conn.reader, nbytes)
                return
            buf = await read_payload(self._conn.reader, nbytes)
            self._inbox.deliver(receiver, start, bytes_tensor(buf, receiver.layout, num_tokens))
        elif nbytes:
            raise ProtocolError(f"{kind.name} with {nbytes} payload bytes")
        elif kind is MsgType.END:
            first_token = field(header, "first_token", (int, type(None)))
            self._inbox.on_end(self, request_id, first_token, field(header, "num_tokens", int))
        elif kind is MsgType.ABORT:
            self._inbox.on_abort(self, request_id, field(header, "reason", str))
        else:
            raise ProtocolError(f"unexpected {kind.name} from a prefill worker")


class TcpTransport(Transport):
    """KV over TCP. Endpoints are ``host:port``. Deadlines: ``connect_timeout_s`` to connect,
    ``io_timeout_s`` for each chunk (or END) to reach the kernel, ``idle_timeout_s`` before an unused
    outgoing connection is closed, and ``transfer_timeout_s``, a watchdog that fails and forgets a
    transfer still open that long after ``open_sender`` / ``expect`` even if nobody waits on it (keep
    it above the deadlines given to ``finish`` and ``wait``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout_s: float = 5.0,
        io_timeout_s: float = 30.0,
        transfer_timeout_s: float = 600.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s, self.io_timeout_s = connect_timeout_s, io_timeout_s
        self.transfer_timeout_s, self.idle_timeout_s = transfer_timeout_s, idle_timeout_s
        self.endpoint: str | None = None
        self._inbox = Inbox(transfer_timeout_s)
        self._server: asyncio.Server | None = None
        self._peers: dict[_TcpPeer, asyncio.Task[None]] = {}
        self._links: dict[str, _TcpLink] = {}
        self._connecting: dict[str, asyncio.Future[_TcpLink]] = {}
        self._closed = False

    @property
    def num_active(self) -> int:
        return len(self._inbox) + sum(len(link.senders) for link in self._links.values())

    @property
    def num_connections(self) -> int:
        """Open connections: outgoing (to decode endpoints) plus incoming (from prefill workers)."""
        return len(self._links) + len(self._peers)

    async def start_server(self) -> str:
        if self._server is None:
            self._server = await asyncio.start_server(self._on_client, self.host, self.port, limit=STREAM_LIMIT_BYTES)
            self.port = self._server.sockets[0].getsockname()[1]
            self.endpoint = f"{self.host}:{self.port}"
        assert self.endpoint is not None
        return self.endpoint

    def expect(self, request_id: str, layout: KVLayout, num_tokens: int, write: WriteFn) -> KVReceiver:
        if self._server is None or self._closed:
            raise RuntimeError("expect() needs a started, open transport: call start_server() first")
        return self._inbox.expect(request_id, layout, num_tokens, write)

    async def open_sender(self, dest: Destination, layout: KVLayout) -> KVSender:
        dest.layout.check_compatible(layout)
        if self._closed:
            raise TransferError("the transport is closed")
        link = self._links.get(dest.kv_endpoint)
        if link is None:
            link = await asyncio.shield(self._connecting_to(dest.kv_endpoint))
        return Sender(link, dest, layout, self.io_timeout_s, self.transfer_timeout_s)

    async def close(self) -> None:
        self._closed = True
        self._inbox.close("the decode worker is shutting down")
        if self._server is not None:
            self._server.close()
        tasks = [*self._peers.values(), *(link.task for link in self._links.values())]
        for peer in list(self._peers):
            peer.close()
        for link in list(self._links.values()):
            link.close("the prefill transport was closed")
        if tasks:
            await asyncio.wait(tasks, timeout=self.connect_timeout_s)
        if self._server is not None:
            await self._server.wait_closed()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _TcpPeer(Connection(reader, writer, str(writer.get_extra_info("peername"))), self._inbox)
        task = asyncio.ensure_future(peer.serve())
        self._peers[peer] = task
        task.add_done_callback(lambda _: self._peers.pop(peer, None))

    def _connecting_to(self, endpoint: str) -> asyncio.Future[_TcpLink]:
        future = self._connecting.get(endpoint)
        if future is None:
            future = self._connecting[endpoint] = asyncio.ensure_future(self._connect(endpoint))
            future.add_done_callback(lambda _: self._connecting.pop(endpoint, None))
        return future

    async def _connect(self, endpoint: str) -> _TcpLink:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a TCP KV endpoint is host:port, got {endpoint!r}")
        opening = asyncio.open_connection(host, int(port), limit=STREAM_LIMIT_BYTES)
        try:
            reader, writer = await asyncio.wait_for(opening, self.connect_timeout_s)
        except asyncio.TimeoutError:
            timeout = self.connect_timeout_s
            raise TransferTimeout(f"connecting to KV endpoint {endpoint} timed out after {timeout:g} s") from None
        except OSError as e:
            raise TransferError(f"cannot connect to KV endpoint {endpoint}: {e.strerror or e}") from e
        link = self._links[endpoint] = _TcpLink(endpoint, Connection(reader, writer, endpoint), self)
        return link

    def _forget_link(self, link: _TcpLink) -> None:
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
