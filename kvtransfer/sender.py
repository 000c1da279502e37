"""The prefill side's state machine, shared by every transport: one Sender per request over a shared Link."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable

import torch

from kvtransfer.base import KVSender, TransferError, TransferRecord, TransferResult, TransferState, TransferTimeout
from kvtransfer.coverage import Coverage
from kvtransfer.layout import KVLayout
from kvtransfer.metadata import Destination


class Link(ABC):
    """The prefill side's view of one connection to a decode endpoint; requests are multiplexed on it.

    Subclasses put messages on the wire and call ``on_ack`` / ``on_abort`` / ``on_lost`` with what
    comes back; this class routes those to the senders by request id.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.senders: dict[str, Sender] = {}
        self.lost_reason: str | None = None

    @abstractmethod
    async def send_chunk(self, request_id: str, start: int, kv: torch.Tensor, layout: KVLayout) -> None:
        """Put CHUNK on the wire; return once ``kv`` (CPU, contiguous) is no longer needed."""

    @abstractmethod
    async def send_end(self, request_id: str, first_token: int | None, num_tokens: int) -> None: ...

    @abstractmethod
    def send_abort(self, request_id: str, reason: str) -> None:
        """Best effort; never raises."""

    @abstractmethod
    def on_idle(self) -> None:
        """The last sender left; a transport may start its idle timer here."""

    def attach(self, sender: Sender) -> None:
        if self.lost_reason is not None:
            raise TransferError(f"connection to {self.endpoint} lost: {self.lost_reason}")
        if sender.request_id in self.senders:
            raise ValueError(f"request {sender.request_id!r} is already being sent to {self.endpoint}")
        self.senders[sender.request_id] = sender

    def detach(self, sender: Sender) -> None:
        if self.senders.get(sender.request_id) is sender:
            del self.senders[sender.request_id]
            if not self.senders and self.lost_reason is None:
                self.on_idle()

    def on_ack(self, request_id: str, ok: bool, error: str | None) -> None:
        if (sender := self.senders.get(request_id)) is not None:
            sender._on_ack(ok, error)

    def on_abort(self, request_id: str, reason: str) -> None:
        if (sender := self.senders.get(request_id)) is not None:
            sender._fail(f"aborted by the decode worker: {reason}", tell=False)

    def on_lost(self, reason: str) -> None:
        """The connection is gone: every sender on it fails now, not at its deadline."""
        if self.lost_reason is None:
            self.lost_reason = reason
        for sender in list(self.senders.values()):
            sender._fail(f"connection to {self.endpoint} lost: {reason}", tell=False)


class Sender(KVSender, TransferRecord):
    """One request's KV on its way to ``dest``; attached to ``link`` until it is final."""

    def __init__(
        self, link: Link, dest: Destination, layout: KVLayout, io_timeout_s: float, transfer_timeout_s: float
    ) -> None:
        self.request_id, self.layout, self.num_tokens, self.dest = dest.request_id, layout, dest.num_tokens, dest
        self._link, self._io_timeout_s = link, io_timeout_s
        self._state = TransferState.BOOTSTRAPPING
        self._coverage = Coverage(dest.num_tokens)
        self._bytes = 0
        self._finishing = False
        self._first_token: int | None = None
        self._error: str | None = None
        self._t_start = time.monotonic()
        self._t_first: float | None = None
        self._t_end: float | None = None
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        link.attach(self)
        self._watchdog = loop.call_later(transfer_timeout_s, self._expire, transfer_timeout_s)

    def poll(self) -> TransferState:
        return self._state

    async def send(self, start_token: int, kv: torch.Tensor) -> None:
        self._check_open()
        self.layout.check(kv)
        num_tokens = kv.shape[2]
        if not self._coverage.in_range(start_token, num_tokens):
            raise ValueError(f"tokens [{start_token}, {start_token + num_tokens}) are outside [0, {self.num_tokens})")
        if num_tokens == 0:
            return
        if self._t_first is None:
            self._state, self._t_first = TransferState.TRANSFERRING, time.monotonic()
        payload = kv.detach().to("cpu").contiguous()
        what = f"sending tokens [{start_token}, {start_token + num_tokens}) to {self._link.endpoint}"
        await self._io(self._link.send_chunk(self.request_id, start_token, payload, self.layout), what)
        self._coverage.add(start_token, num_tokens)
        self._bytes += payload.numel() * payload.element_size()
        self._check_open()

    async def finish(self, first_token: int | None, timeout_s: float) -> TransferResult:
        if self._state.terminal or self._finishing:
            await asyncio.wait([self._done], timeout=timeout_s)
            return self.result()
        if (gap := self._coverage.first_gap()) is not None:
            self._fail(f"finish() before tokens [{gap[0]}, {gap[1]}) were sent", tell=True)
            return self.result()
        self._finishing, self._first_token = True, first_token
        try:
            await asyncio.wait_for(self._end_and_wait(first_token), timeout_s)
        except asyncio.TimeoutError:
            self._fail(f"no acknowledgement from the decode worker within {timeout_s:g} s", tell=True)
        except TransferError:
            pass
        return self.result()

    def abort(self, reason: str) -> None:
        self._fail(f"aborted by the prefill worker: {reason}", tell=True, wire_reason=reason)

    async def _end_and_wait(self, first_token: int | None) -> None:
        await self._io(self._link.send_end(self.request_id, first_token, self.num_tokens), "sending END")
        await asyncio.shield(self._done)

    async def _io(self, step: Awaitable[None], what: str) -> None:
        """Await one hand-off to the wire under the I/O deadline; failures fail the transfer and raise."""
        try:
            await asyncio.wait_for(step, self._io_timeout_s)
        except asyncio.TimeoutError:
            self._fail(f"{what} timed out after {self._io_timeout_s:g} s (the decode worker is not reading)", tell=True)
            raise TransferTimeout(self._error) from None
        except (OSError, TransferError) as e:
            self._fail(f"{what} failed: {e}", tell=False)
            raise TransferError(self._error) from e

    def _check_open(self) -> None:
        if self._state is TransferState.FAILED:
            raise TransferError(self._error)
        if self._finishing or self._state.terminal:
            raise TransferError(f"request {self.request_id!r}: send() after finish()")

    def _on_ack(self, ok: bool, error: str | None) -> None:
        if not ok:
            self._fail(f"the decode worker refused: {error}", tell=False)
        elif self._finishing and not self._state.terminal:
            self._end(TransferState.DONE)

    def _expire(self, timeout_s: float) -> None:
        self._fail(f"transfer deadline of {timeout_s:g} s passed ({self._coverage.num_seen} tokens sent)", tell=True)

    def _fail(self, error: str, tell: bool, wire_reason: str | None = None) -> None:
        if self._state.terminal:
            return
        self._error = error
        if tell and self._link.lost_reason is None:
            self._link.send_abort(self.request_id, wire_reason or error)
        self._end(TransferState.FAILED)

    def _end(self, state: TransferState) -> None:
        self._state, self._t_end = state, time.monotonic()
        self._watchdog.cancel()
        if not self._done.done():
            self._done.set_result(None)
        self._link.detach(self)
