"""The routing policy (pure): least loaded, expired and excluded workers never picked, chunk plans."""

from __future__ import annotations

import random

import pytest

from gateway.router import DECODE_ROLES, PREFILL_ROLES, Plan, pick, plan
from protos.splitserve.internal.v1 import worker_pb2

NOW = 1_000_000.0
TTL = 3.0


def worker(worker_id: str, role: str = "decode", used: int = 0, total: int = 100, queued: int = 0, running: int = 0,
           age_s: float = 0.0) -> worker_pb2.WorkerInfo:
    load = worker_pb2.WorkerLoad(num_kv_blocks=total, used_kv_blocks=used, queued_tokens=queued, num_running=running)
    return worker_pb2.WorkerInfo(worker_id=worker_id, role=role, address=f"{worker_id}:1", load=load,
                                 heartbeat_unix_s=NOW - age_s)


def picked(workers: list[worker_pb2.WorkerInfo], **kwargs: object) -> str | None:
    kwargs.setdefault("roles", DECODE_ROLES)
    chosen = pick(workers, now_s=NOW, ttl_s=TTL, rng=random.Random(0), **kwargs)  # type: ignore[arg-type]
    return chosen.worker_id if chosen is not None else None


def test_least_kv_usage_wins_then_queued_tokens_then_running() -> None:
    assert picked([worker("a", used=50), worker("b", used=10), worker("c", used=30)]) == "b"
    assert picked([worker("a", used=10, queued=500), worker("b", used=10, queued=20)]) == "b"
    assert picked([worker("a", queued=5, running=3), worker("b", queued=5, running=1)]) == "b"
    assert picked([worker("a", used=10, queued=0), worker("b", used=20, queued=0, running=0)]) == "a"


def test_usage_is_relative_to_each_workers_pool() -> None:
    assert picked([worker("small", used=40, total=50), worker("big", used=100, total=1000)]) == "big"


def test_workers_of_other_roles_are_never_picked() -> None:
    workers = [worker("p", role="prefill"), worker("d", role="decode", used=99)]
    assert picked(workers) == "d"
    assert picked(workers, roles=PREFILL_ROLES) == "p"
    assert picked([worker("d")], roles=PREFILL_ROLES) is None


def test_expired_heartbeats_are_never_picked() -> None:
    assert picked([worker("old", age_s=TTL + 0.01), worker("busy", used=99)]) == "busy"
    assert picked([worker("edge", age_s=TTL)]) == "edge"
    assert picked([worker("old", age_s=60)]) is None


def test_excluded_ids_are_never_picked() -> None:
    workers = [worker("a"), worker("b", used=50)]
    assert picked(workers, exclude={"a"}) == "b"
    assert picked(workers, exclude={"a", "b"}) is None


def test_gateway_local_load_spreads_ties() -> None:
    workers = [worker("a"), worker("b")]
    assert picked(workers, local_inflight={"a": 2}) == "b"
    assert picked(workers, local_inflight={"a": 1, "b": 3}) == "a"


def test_ties_are_broken_at_random() -> None:
    workers = [worker("a"), worker("b"), worker("c")]
    rng = random.Random(1)
    chosen = {pick(workers, DECODE_ROLES, NOW, TTL, rng=rng).worker_id for _ in range(60)}  # type: ignore[union-attr]
    assert chosen == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("prompt_len", "chunk_size", "max_chunks", "threshold", "expected"),
    [
        (10, 512, 0, 32, 0),          # short prompt: the decode worker computes it all
        (31, 512, 0, 32, 0),
        (32, 512, 0, 32, 32),         # at the threshold: disaggregated
        (5000, 512, 0, 32, 5000),     # k = 0: the whole prompt on the prefill group
        (5000, 512, 2, 32, 1024),     # k chunks, the leftover on the decode worker
        (1000, 512, 2, 32, 1000),     # k chunks cover more than the prompt
        (1024, 512, 2, 32, 1024),
        (1, 1, 1, 0, 1),              # threshold 0: never skip
        (0, 512, 0, 0, 0),
    ],
)
def test_plan(prompt_len: int, chunk_size: int, max_chunks: int, threshold: int, expected: int) -> None:
    assert plan(prompt_len, chunk_size, max_chunks, threshold) == Plan(expected)


@pytest.mark.parametrize("args", [(-1, 512, 0, 32), (10, 0, 0, 32), (10, 512, -1, 32), (10, 512, 0, -1)])
def test_plan_refuses_bad_arguments(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="bad plan arguments"):
        plan(*args)
