"""The disaggregated cluster end to end: gateway, prefill and decode worker processes, a real Redis.

Every answer is checked token for token against the in-process engine, for prompts that go all to
the prefill group, split between both groups, and all to the decode group.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams
from protos.splitserve.internal.v1 import worker_pb2, worker_pb2_grpc
from splitserve.client import AsyncClient, Client
from splitserve.launcher import LocalCluster

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/0"  # CI's Redis; the launcher tests cover the embedded one
WORKER_OPTIONS = {"num_kv_blocks": 512, "dtype": "float32", "max_num_batched_tokens": 64, "prefill_chunk_size": 16,
                  "max_num_seqs": 32}
# Chunk C = 16, k = 2: the prefill group computes at most 32 tokens; prompts under 8 skip it.
GATEWAY_OPTIONS = {"chunk_size": 16, "max_prefill_chunks": 2, "short_prompt_threshold": 8}
PLANS = {"decode only": 5, "all prefill": 20, "split": 60}  # prompt length -> where its tokens are computed
EXPECTED_ON_PREFILL = {"decode only": 0, "all prefill": 20, "split": 32}


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt * 11) % 400 + 1 for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(make_checkpoint: Any) -> Any:
    return make_checkpoint("llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def offline(model_dir: Any) -> Any:
    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", num_kv_blocks=512))

    def generate(prompt: list[int], n: int) -> list[int]:
        return engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids

    return generate


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["1P+1D", "2P+2D"])
def cluster(request: pytest.FixtureRequest, model_dir: Any) -> Iterator[LocalCluster]:
    prefill, decode = request.param
    # the larger cluster's workers run ahead of their tokens (async scheduling, the CUDA default) on the CPU
    options = {**WORKER_OPTIONS, "async_scheduling": decode > 1}
    with LocalCluster(model_dir, prefill_workers=prefill, decode_workers=decode, redis_url=REDIS_URL,
                      worker_options=options, gateway_options=GATEWAY_OPTIONS) as c:
        yield c


def worker_loads(cluster: LocalCluster) -> dict[str, worker_pb2.WorkerLoad]:
    """Each live worker's load, asked of the worker itself (not the heartbeat's copy)."""
    r = redis.Redis.from_url(REDIS_URL)
    loads = {}
    for key in r.scan_iter(f"{cluster.prefix}:worker:*"):
        info = worker_pb2.WorkerInfo.FromString(r.get(key))
        with grpc.insecure_channel(info.address) as ch:
            stubs = {"decode": worker_pb2_grpc.DecodeWorkerStub, "prefill": worker_pb2_grpc.PrefillWorkerStub}
            stub = stubs[info.role](ch)
            loads[info.worker_id] = stub.Stats(worker_pb2.StatsRequest(), timeout=5).load
    r.close()
    return loads


def assert_no_kv_in_use(cluster: LocalCluster, within_s: float = 1.5) -> None:
    deadline = time.monotonic() + within_s
    while True:
        used = {w: load.used_kv_blocks for w, load in worker_loads(cluster).items()}
        if not any(used.values()):
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {used}"
        time.sleep(0.05)


@pytest.mark.parametrize("plan", list(PLANS))
def test_generate_and_stream_match_the_offline_engine(cluster: LocalCluster, offline: Any, plan: str) -> None:
    prompt = prompt_of(PLANS[plan])
    expected = offline(prompt, 12)
    with Client(cluster.address, timeout=60) as client:
        result = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
        chunks = list(client.stream(prompt, max_new_tokens=12, ignore_eos=True))
    assert result.token_ids == expected
    assert [t for c in chunks for t in c.token_ids] == expected
    assert result.finish_reason == "length" and chunks[-1].finish_reason == "length"
    usage, timings = result.usage, result.timings
    assert usage["prefill_tokens_on_prefill_worker"] == EXPECTED_ON_PREFILL[plan]
    assert usage["prefill_tokens_on_decode_worker"] == PLANS[plan] - EXPECTED_ON_PREFILL[plan]
    if EXPECTED_ON_PREFILL[plan]:
        assert result.prefill_worker.startswith("prefill-")
        assert timings["transfer_ms"] > 0 and timings["transfer_bytes"] > 0
    else:
        assert result.prefill_worker == "" and timings["transfer_bytes"] == 0
    assert 0 < timings["ttft_ms"] <= timings["e2e_ms"]
    assert_no_kv_in_use(cluster)


def test_32_concurrent_requests(cluster: LocalCluster, offline: Any) -> None:
    prompts = [prompt_of(n, salt) for salt, n in enumerate([5, 20, 60, 9] * 8)]
    expected = [offline(p, 10) for p in prompts]

    async def run() -> list[list[int]]:
        async with AsyncClient(cluster.address, timeout=120) as client:
            results = await asyncio.gather(*(client.generate(p, max_new_tokens=10, ignore_eos=True) for p in prompts))
        return [r.token_ids for r in results]

    assert asyncio.run(run()) == expected
    assert_no_kv_in_use(cluster)


def test_cancelled_stream_frees_kv_everywhere(cluster: LocalCluster) -> None:
    with Client(cluster.address) as client:
        stream = client.stream(prompt_of(60), max_new_tokens=900, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break  # leaving the iterator cancels the call
    assert_no_kv_in_use(cluster, within_s=1.5)


def test_deadline_exceeded_frees_kv_everywhere(cluster: LocalCluster) -> None:
    with Client(cluster.address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate(prompt_of(60), max_new_tokens=900, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_no_kv_in_use(cluster, within_s=1.5)


def test_bad_input_is_refused_and_the_gateway_keeps_serving(cluster: LocalCluster, offline: Any) -> None:
    with Client(cluster.address, timeout=30) as client:
        for kwargs in ({"prompt": [1, 999_999]}, {"prompt": [1, 2], "max_new_tokens": 0},
                       {"prompt": [1, 2], "temperature": -1.0}, {"prompt": [1] * 2000}):
            with pytest.raises(grpc.RpcError) as err:
                client.generate(**kwargs)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()
        assert client.generate(prompt_of(20), max_new_tokens=4, ignore_eos=True).token_ids == offline(prompt_of(20), 4)


def test_workers_join_and_leave_at_run_time(cluster: LocalCluster, offline: Any) -> None:
    """Runs last on each cluster: it adds a decode worker, then kills one mid-stream."""
    new_id = cluster.add_worker("decode")
    deadline = time.monotonic() + 20
    seen: set[str] = set()
    with Client(cluster.address, timeout=60) as client:
        while new_id not in seen:
            assert time.monotonic() < deadline, f"{new_id} never got a request (saw {seen})"
            seen.add(client.generate(prompt_of(5), max_new_tokens=2, ignore_eos=True).decode_worker)

        # Kill the decode worker serving a long stream: the gateway retries elsewhere, the client sees
        # one complete, correct answer.
        prompt, n = prompt_of(20, salt=3), 600
        expected = offline(prompt, n)
        tokens: list[int] = []
        victim = None
        for chunk in client.stream(prompt, max_new_tokens=n, ignore_eos=True):
            tokens += chunk.token_ids
            if len(tokens) >= 20 and victim is None:
                victim = _busiest_decode_worker(cluster)
                cluster.kill_worker(victim, signal.SIGKILL)
        assert victim is not None and tokens == expected
        assert chunk.decode_worker != victim

        # After its TTL the killed worker is never picked.
        time.sleep(3.5)
        served = {client.generate(prompt_of(5, s), max_new_tokens=2, ignore_eos=True).decode_worker for s in range(8)}
        assert victim not in served
    assert_no_kv_in_use(cluster)


def _busiest_decode_worker(cluster: LocalCluster) -> str:
    loads = {w: load for w, load in worker_loads(cluster).items() if w.startswith("decode-")}
    return max(loads, key=lambda w: loads[w].num_running)
