"""Routing policy, no I/O: which live worker takes a request, and how its prompt is split (the chunk plan)."""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from protos.splitserve.internal.v1 import worker_pb2

DECODE_ROLES = frozenset({"decode", "colocated"})
PREFILL_ROLES = frozenset({"prefill"})


@dataclass(frozen=True)
class Plan:
    """Prompt tokens [0, num_prefill_tokens) go to the prefill group; the decode worker computes the rest."""

    num_prefill_tokens: int


def plan(prompt_len: int, chunk_size: int, max_prefill_chunks: int, short_prompt_threshold: int) -> Plan:
    """The chunk plan of one prompt.

    Prompts shorter than ``short_prompt_threshold`` skip the prefill group (a transfer costs more
    than computing them on the decode worker); otherwise the prefill group computes
    ``min(prompt_len, max_prefill_chunks * chunk_size)`` tokens, all of them when
    ``max_prefill_chunks`` is 0, and the decode worker computes the leftover.
    """
    if prompt_len < 0 or chunk_size < 1 or max_prefill_chunks < 0 or short_prompt_threshold < 0:
        raise ValueError(
            f"bad plan arguments: prompt_len={prompt_len} chunk_size={chunk_size} "
            f"max_prefill_chunks={max_prefill_chunks} short_prompt_threshold={short_prompt_threshold}"
        )
    if prompt_len < short_prompt_threshold:
        return Plan(0)
    if max_prefill_chunks == 0:
        return Plan(prompt_len)
    return Plan(min(prompt_len, max_prefill_chunks * chunk_size))


def is_live(worker: worker_pb2.WorkerInfo, now_s: float, ttl_s: float) -> bool:
    """A registry entry is live while its last heartbeat (unix seconds) is at most ``ttl_s`` old."""
    return now_s - worker.heartbeat_unix_s <= ttl_s


def load_key(worker: worker_pb2.WorkerInfo, local_inflight: int = 0) -> tuple[float, int, int]:
    """Smaller is less loaded: KV usage, then queued tokens, then running requests.

    ``local_inflight`` (requests this gateway sent the worker) is added to the running count, so
    that requests arriving between two heartbeats spread over workers reporting the same load.
    """
    load = worker.load
    usage = load.used_kv_blocks / load.num_kv_blocks if load.num_kv_blocks else 0.0
    return usage, load.queued_tokens, load.num_running + local_inflight


def pick(
    workers: Iterable[worker_pb2.WorkerInfo],
    roles: Collection[str],
    now_s: float,
    ttl_s: float,
    exclude: Collection[str] = (),
    local_inflight: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
) -> worker_pb2.WorkerInfo | None:
    """The least-loaded live worker with a role in ``roles``, not in ``exclude`` (ids); ties broken at random.

    None if there is none.
    """
    local_inflight = local_inflight or {}
    candidates = [
        w for w in workers if w.role in roles and w.worker_id not in exclude and is_live(w, now_s, ttl_s)
    ]
    if not candidates:
        return None
    keys = {w.worker_id: load_key(w, local_inflight.get(w.worker_id, 0)) for w in candidates}
    best = min(keys.values())
    tied = [w for w in candidates if keys[w.worker_id] == best]
    return (rng or random).choice(tied)
