"""kvtransfer: moves the KV of a request's tokens from a prefill worker to a decode worker.

Decode: ``endpoint = await t.start_server()``; per request ``r = t.expect(id, layout, n, write)``,
publish ``Destination(id, worker, endpoint, block_ids, n, layout)`` in a MetadataStore, then
``await r.wait(timeout_s)``. Prefill: ``dest = await store.wait_for(id, timeout_s)``,
``s = await t.open_sender(dest, layout)``, ``await s.send(start, kv)`` per chunk, then
``await s.finish(first_token, timeout_s)``. Both results are TransferResults; on FAILED decode
recomputes the prompt itself.
"""

from __future__ import annotations

from typing import Any

from kvtransfer.base import (
    KVReceiver,
    KVSender,
    TransferError,
    TransferResult,
    TransferState,
    TransferTimeout,
    Transport,
    WriteFn,
)
from kvtransfer.layout import KVLayout, LayoutMismatch
from kvtransfer.local import LocalTransport
from kvtransfer.metadata import Destination, InMemoryMetadataStore, MetadataStore, RedisMetadataStore
from kvtransfer.tcp import TcpTransport

TRANSPORTS: dict[str, type[Transport]] = {"tcp": TcpTransport, "local": LocalTransport}


def make_transport(kind: str, **kw: Any) -> Transport:
    """A transport by name: ``tcp`` (TcpTransport(host, port, ...)) or ``local`` (LocalTransport(name, ...))."""
    try:
        cls = TRANSPORTS[kind]
    except KeyError:
        raise ValueError(f"unknown KV transport {kind!r}; known: {', '.join(sorted(TRANSPORTS))}") from None
    return cls(**kw)


__all__ = [
    "TRANSPORTS",
    "Destination",
    "InMemoryMetadataStore",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "LayoutMismatch",
    "LocalTransport",
    "MetadataStore",
    "RedisMetadataStore",
    "TcpTransport",
    "TransferError",
    "TransferResult",
    "TransferState",
    "TransferTimeout",
    "Transport",
    "WriteFn",
    "make_transport",
]
