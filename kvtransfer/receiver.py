"""The decode side's state machine, shared by every transport: expected requests, checks, writes, answers."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from kvtransfer.base import KVReceiver, TransferRecord, TransferResult, TransferState, WriteFn
from kvtransfer.coverage import Coverage
from kvtransfer.layout import KVLayout, LayoutMismatch


class Peer(ABC):
    """The decode side's view of one connection from a prefill worker: how to answer it (best effort)."""

    @abstractmethod
    def send_ack(self, request_id: str, ok: bool, error: str | None) -> None: ...

    @abstractmethod
    def send_abort(self, request_id: str, reason: str) -> None: ...


class Receiver(KVReceiver, TransferRecord):
    """One expected request. Bound to the first connection that sends for it; forgotten once final."""

    def __init__(self, inbox: Inbox, request_id: str, layout: KVLayout, num_tokens: int, write: WriteFn) -> None:
        self.request_id, self.layout, self.num_tokens = request_id, layout, num_tokens
        self.peer: Peer | None = None
        self._inbox, self._write = inbox, write
        self._state = TransferState.BOOTSTRAPPING
        self._coverage = Coverage(num_tokens)
        self._bytes = 0
        self._first_token: int | None = None
        self._error: str | None = None
        self._t_start = time.monotonic()
        self._t_first: float | None = None
        self._t_end: float | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._watchdog = loop.call_later(inbox.transfer_timeout_s, self._expire, inbox.transfer_timeout_s)

    def poll(self) -> TransferState:
        return self._state

    async def wait(self, timeout_s: float) -> TransferResult:
        if not self._state.terminal:
            try:
                await asyncio.wait_for(asyncio.shield(self._done), timeout_s)
            except asyncio.TimeoutError:
                self._fail(f"timed out after {timeout_s:g} s waiting for KV ({self._progress()})", tell_abort=True)
        return self.result()

    def abort(self, reason: str) -> None:
        self._fail(f"aborted by the decode worker: {reason}", tell_abort=True)

    def _progress(self) -> str:
        return f"{self._coverage.num_seen} of {self.num_tokens} tokens written"

    def _expire(self, timeout_s: float) -> None:
        self._fail(f"transfer deadline of {timeout_s:g} s passed ({self._progress()})", tell_abort=True)

    def _refuse(self, error: str) -> None:
        """Fail because of what the sender sent, and answer ACK(ok=False)."""
        if not self._state.terminal and self.peer is not None:
            self.peer.send_ack(self.request_id, False, error)
        self._fail(error, tell_abort=False)

    def _fail(self, error: str, tell_abort: bool) -> None:
        if self._state.terminal:
            return
        self._error = error
        if tell_abort and self.peer is not None:
            self.peer.send_abort(self.request_id, error)
        self._end(TransferState.FAILED)

    def _end(self, state: TransferState) -> None:
        self._state, self._t_end = state, time.monotonic()
        self._watchdog.cancel()
        if not self._done.done():
            self._done.set_result(None)
        self._inbox.forget(self)


class Inbox:
    """Every receiver of one decode transport, by request id, and the checks on what arrives.

    A transport calls ``accept_chunk`` with a CHUNK's header (before reading its payload, so a
    refused payload can be skipped), then ``deliver`` with the payload as a tensor; ``on_end``,
    ``on_abort`` and ``on_peer_lost`` for the rest.
    """

    def __init__(self, transfer_timeout_s: float) -> None:
        self.transfer_timeout_s = transfer_timeout_s
        self._receivers: dict[str, Receiver] = {}

    def __len__(self) -> int:
        return len(self._receivers)

    def expect(self, request_id: str, layout: KVLayout, num_tokens: int, write: WriteFn) -> Receiver:
        if request_id in self._receivers:
            raise ValueError(f"request {request_id!r} is already expected")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1 (0 tokens need no transfer), got {num_tokens}")
        receiver = Receiver(self, request_id, layout, num_tokens, write)
        self._receivers[request_id] = receiver
        return receiver

    def forget(self, receiver: Receiver) -> None:
        if self._receivers.get(receiver.request_id) is receiver:
            del self._receivers[receiver.request_id]

    def accept_chunk(
        self, peer: Peer, request_id: str, start: int, num_tokens: int, layout: dict[str, Any], nbytes: int
    ) -> Receiver | None:
        """The receiver to deliver this chunk to, or None when it was refused (and answered)."""
        receiver = self._bind(peer, request_id)
        if receiver is None:
            return None
        try:
            receiver.layout.check_compatible(KVLayout.from_dict(layout))
        except (LayoutMismatch, ValueError) as e:
            receiver._refuse(f"layout mismatch: {e}")
            return None
        end = start + num_tokens
        if num_tokens < 1 or not receiver._coverage.in_range(start, num_tokens):
            receiver._refuse(f"tokens [{start}, {end}) are beyond the {receiver.num_tokens} tokens expected")
            return None
        expected = num_tokens * receiver.layout.bytes_per_token()
        if nbytes != expected:
            receiver._refuse(f"chunk of tokens [{start}, {end}) has {nbytes} bytes, expected {expected}")
            return None
        if receiver._t_first is None:
            receiver._state, receiver._t_first = TransferState.TRANSFERRING, time.monotonic()
        return receiver

    def deliver(self, receiver: Receiver, start: int, kv: torch.Tensor) -> None:
        if receiver.poll().terminal:
            return
        num_tokens = kv.shape[2]
        try:
            receiver._write(start, kv)
        except Exception as e:
            receiver._refuse(f"writing tokens [{start}, {start + num_tokens}) failed: {e!r}")
            return
        receiver._coverage.add(start, num_tokens)
        receiver._bytes += kv.numel() * kv.element_size()

    def on_end(self, peer: Peer, request_id: str, first_token: int | None, num_tokens: int) -> None:
        receiver = self._bind(peer, request_id)
        if receiver is None:
            return
        if num_tokens != receiver.num_tokens:
            receiver._refuse(f"END says {num_tokens} tokens, the decode worker expected {receiver.num_tokens}")
        elif (gap := receiver._coverage.first_gap()) is not None:
            receiver._refuse(f"END arrived before tokens [{gap[0]}, {gap[1]}) were written")
        else:
            receiver._first_token = first_token
            peer.send_ack(request_id, True, None)
            receiver._end(TransferState.DONE)

    def on_abort(self, peer: Peer, request_id: str, reason: str) -> None:
        receiver = self._receivers.get(request_id)
        if receiver is not None and receiver.peer in (None, peer):
            receiver._fail(f"aborted by the prefill worker: {reason}", tell_abort=False)

    def on_peer_lost(self, peer: Peer, reason: str) -> None:
        for receiver in list(self._receivers.values()):
            if receiver.peer is peer:
                receiver._fail(f"connection from the prefill worker lost: {reason}", tell_abort=False)

    def close(self, reason: str) -> None:
        for receiver in list(self._receivers.values()):
            receiver._fail(f"decode transport closed: {reason}", tell_abort=True)

    def _bind(self, peer: Peer, request_id: str) -> Receiver | None:
        receiver = self._receivers.get(request_id)
        if receiver is None:
            peer.send_ack(request_id, False, f"unknown request {request_id!r}: not expected here, or already over")
            return None
        if receiver.peer is None:
            receiver.peer = peer
        elif receiver.peer is not peer:
            peer.send_ack(request_id, False, f"request {request_id!r} is already being received on another connection")
            return None
        return receiver
