"""LocalTransport: an in-process fake of the TCP transport, same state machines, no sockets, test hooks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kvtransfer.base import KVReceiver, KVSender, TransferError, Transport, WriteFn
from kvtransfer.layout import KVLayout
from kvtransfer.metadata import Destination
from kvtransfer.receiver import Inbox, Peer
from kvtransfer.sender import Link, Sender


def _later(delay_s: float, callback: Callable[..., Any], *args: Any) -> None:
    """Run ``callback`` on a later loop iteration, as if it had crossed a network."""
    loop = asyncio.get_running_loop()
    if delay_s > 0:
        loop.call_later(delay_s, callback, *args)
    else:
        loop.call_soon(callback, *args)


class _LocalLink(Link):
    """A 'connection' from the transport ``source`` (prefill) to ``target`` (decode)."""

    def __init__(self, endpoint: str, source: LocalTransport, target: LocalTransport) -> None:
        super().__init__(endpoint)
        self.source, self.target = source, target
        self.peer = _LocalPeer(self)

    async def send_chunk(self, request_id: str, start: int, kv: torch.Tensor, layout: KVLayout) -> None:
        await self._hop()
        if self.source.fail_next_send:
            self.source.fail_next_send = False
            self.drop("injected failure (fail_next_send)")
        self._check_up()
        inbox, nbytes = self.target._inbox, kv.numel() * kv.element_size()
        receiver = inbox.accept_chunk(self.peer, request_id, start, kv.shape[2], layout.to_dict(), nbytes)
        if receiver is not None:
            inbox.deliver(receiver, start, kv.clone())

    async def send_end(self, request_id: str, first_token: int | None, num_tokens: int) -> None:
        await self._hop()
        self._check_up()
        self.target._inbox.on_end(self.peer, request_id, first_token, num_tokens)

    def send_abort(self, request_id: str, reason: str) -> None:
        if self.lost_reason is None:
            _later(self.source.delay_s, self.target._inbox.on_abort, self.peer, request_id, reason)

    def on_idle(self) -> None:
        pass

    def drop(self, reason: str) -> None:
        """Both ends see the connection go: every transfer on it fails now."""
        self.on_lost(reason)
        self.target._inbox.on_peer_lost(self.peer, reason)
        self.target._inbound.discard(self)
        if self.source._links.get(self.endpoint) is self:
            del self.source._links[self.endpoint]

    async def _hop(self) -> None:
        await asyncio.sleep(self.source.delay_s)

    def _check_up(self) -> None:
        if self.lost_reason is not None:
            raise ConnectionResetError(f"connection to {self.endpoint} lost: {self.lost_reason}")


class _LocalPeer(Peer):
    """The decode end of a _LocalLink: answers travel back after the target's ``delay_s``."""

    def __init__(self, link: _LocalLink) -> None:
        self._link = link

    def send_ack(self, request_id: str, ok: bool, error: str | None) -> None:
        if self._link.lost_reason is None:
            _later(self._link.target.delay_s, self._link.on_ack, request_id, ok, error)

    def send_abort(self, request_id: str, reason: str) -> None:
        if self._link.lost_reason is None:
            _later(self._link.target.delay_s, self._link.on_abort, request_id, reason)


class LocalTransport(Transport):
    """The TCP transport's semantics inside one process. Endpoints are ``local://<name>``, found in a
    class-level registry; chunks are copied, never shared. Links are not closed when idle.

    Test hooks, acting on what THIS transport sends: ``delay_s`` delays every message (chunks, END,
    ABORT; ACKs when it receives); ``fail_next_send`` makes the next chunk drop the connection, as a
    dead network would: every transfer on it fails, on both sides.
    """

    _registry: ClassVar[dict[str, LocalTransport]] = {}
    _names: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(
        self, name: str | None = None, *, io_timeout_s: float = 30.0, transfer_timeout_s: float = 600.0
    ) -> None:
        self.name = name or f"local-{next(self._names)}"
        self.io_timeout_s, self.transfer_timeout_s = io_timeout_s, transfer_timeout_s
        self.fail_next_send = False
        self.delay_s = 0.0
        self.endpoint: str | None = None
        self._inbox = Inbox(transfer_timeout_s)
        self._links: dict[str, _LocalLink] = {}
        self._inbound: set[_LocalLink] = set()
        self._closed = False

    @property
    def num_active(self) -> int:
        return len(self._inbox) + sum(len(link.senders) for link in self._links.values())

    @property
    def num_connections(self) -> int:
        return len(self._links) + len(self._inbound)

    async def start_server(self) -> str:
        endpoint = f"local://{self.name}"
        if self._registry.setdefault(endpoint, self) is not self:
            raise ValueError(f"local KV endpoint {endpoint} is already served by another transport")
        self.endpoint = endpoint
        return endpoint

    def expect(self, request_id: str, layout: KVLayout, num_tokens: int, write: WriteFn) -> KVReceiver:
        if self.endpoint is None or self._closed:
            raise RuntimeError("expect() needs a started, open transport: call start_server() first")
        return self._inbox.expect(request_id, layout, num_tokens, write)

    async def open_sender(self, dest: Destination, layout: KVLayout) -> KVSender:
        dest.layout.check_compatible(layout)
        if self._closed:
            raise TransferError("the transport is closed")
        await asyncio.sleep(0)
        target = self._registry.get(dest.kv_endpoint)
        if target is None:
            raise TransferError(f"cannot connect to KV endpoint {dest.kv_endpoint}: no local transport serves it")
        link = self._links.get(dest.kv_endpoint)
        if link is None or link.target is not target:
            link = self._links[dest.kv_endpoint] = _LocalLink(dest.kv_endpoint, self, target)
            target._inbound.add(link)
        return Sender(link, dest, layout, self.io_timeout_s, self.transfer_timeout_s)

    async def close(self) -> None:
        self._closed = True
        if self.endpoint is not None and self._registry.get(self.endpoint) is self:
            del self._registry[self.endpoint]
        self._inbox.close("the decode worker is shutting down")
        for link in [*self._links.values(), *self._inbound]:
            link.drop("the transport was closed")
        await asyncio.sleep(0)
