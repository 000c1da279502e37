"""The KV transfer interface: one sender (prefill) and one receiver (decode) per request, over a Transport."""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvtransfer.layout import KVLayout

if TYPE_CHECKING:
    from kvtransfer.metadata import Destination

WriteFn = Callable[[int, torch.Tensor], None]
"""``write(start_token, kv)``: the decode side scatters ``kv`` (``layout.shape(n)``, CPU) into its
own blocks for tokens ``[start_token, start_token + n)``. It runs on the event loop; ``kv`` belongs
to the receiver and is not reused, so ``write`` may keep it. An exception from ``write`` fails the
transfer."""


class TransferError(RuntimeError):
    """A transfer failed: dead peer, dropped connection, refusal, abort."""


class TransferTimeout(TransferError, TimeoutError):
    """A deadline passed: no destination, no acknowledgement, no data."""


class TransferState(enum.Enum):
    """Both sides poll this. Every non-terminal state has a deadline; DONE and FAILED are final.

    Sender:   BOOTSTRAPPING (connected, nothing sent) -> TRANSFERRING -> DONE (acknowledged) | FAILED
    Receiver: BOOTSTRAPPING (expected, nothing came)  -> TRANSFERRING -> DONE (all tokens + END) | FAILED
    """

    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


@dataclass(frozen=True)
class TransferResult:
    """How one side's transfer ended. ``seconds`` runs from the first chunk (or, if none came, from
    the start: ``open_sender`` / ``expect``) to the end; ``bytes`` counts KV payload only."""

    request_id: str
    state: TransferState
    num_tokens: int
    bytes: int
    seconds: float
    first_token: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def gbps(self) -> float:
        """Payload throughput in GB/s (10^9 bytes per second)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class TransferRecord:
    """The bookkeeping both ends of a transfer keep, and the TransferResult it amounts to."""

    request_id: str
    _state: TransferState
    _coverage: Any  # kvtransfer.coverage.Coverage: which tokens have arrived
    _bytes: int
    _first_token: int | None
    _error: str | None
    _t_start: float
    _t_first: float | None
    _t_end: float | None

    def result(self) -> TransferResult:
        """Seconds run from the first byte (or the start, if none came) to the end (or now)."""
        start = self._t_first if self._t_first is not None else self._t_start
        end = self._t_end if self._t_end is not None else time.monotonic()
        return TransferResult(self.request_id, self._state, self._coverage.num_seen, self._bytes, end - start,
                              self._first_token, self._error)


class KVSender(ABC):
    """Prefill side, one per request: send token ranges in any order, then ``finish``.

    The caller owns ``kv`` and may reuse it once ``send`` returns. Call on the event loop.
    """

    request_id: str
    layout: KVLayout
    num_tokens: int

    @abstractmethod
    async def send(self, start_token: int, kv: torch.Tensor) -> None:
        """Send tokens ``[start_token, start_token + n)``, ``kv`` of ``layout.shape(n)`` (GPU tensors are
        copied to the CPU for TCP). Returns when the bytes are handed to the transport; raises
        TransferError (TransferTimeout past the transport's I/O deadline) once the transfer failed."""

    @abstractmethod
    async def finish(self, first_token: int | None, timeout_s: float) -> TransferResult:
        """Send END with the sampled first token and wait up to ``timeout_s`` for the receiver's
        acknowledgement. Never raises for transfer failures: the result says FAILED and why."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Fail the transfer now and tell the receiver (best effort). No-op when already final."""

    @abstractmethod
    def poll(self) -> TransferState: ...


class KVReceiver(ABC):
    """Decode side, one per request, made by ``Transport.expect``. Call on the event loop."""

    request_id: str
    layout: KVLayout
    num_tokens: int

    @abstractmethod
    def poll(self) -> TransferState: ...

    @abstractmethod
    async def wait(self, timeout_s: float) -> TransferResult:
        """Wait until DONE or FAILED. Past ``timeout_s`` the transfer FAILS (the error says timeout)
        and a connected sender is told. Never raises for transfer failures."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Fail the transfer now and tell a connected sender. No-op when already final."""


class Transport(ABC):
    """One per worker process (rank). Decode side: ``start_server``, then ``expect`` per request,
    BEFORE publishing its Destination (decode allocates first). Prefill side: ``open_sender`` per
    request; connections are cached per peer endpoint, multiplex requests and close when idle.

    A receiver forgets its request once DONE or FAILED; ``num_active`` counts both directions."""

    @abstractmethod
    async def start_server(self) -> str:
        """Start receiving; returns the endpoint to publish in Destination.kv_endpoint."""

    @abstractmethod
    def expect(self, request_id: str, layout: KVLayout, num_tokens: int, write: WriteFn) -> KVReceiver:
        """Post a receive for tokens ``[0, num_tokens)`` of ``request_id`` (unique while active)."""

    @abstractmethod
    async def open_sender(self, dest: Destination, layout: KVLayout) -> KVSender:
        """Connect (or reuse a connection) to ``dest.kv_endpoint``. Raises LayoutMismatch when ``layout``
        cannot be written as ``dest.layout``, TransferError when the endpoint cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving and fail every transfer in flight, both directions."""

    @property
    @abstractmethod
    def num_active(self) -> int:
        """Senders plus receivers not yet forgotten."""
