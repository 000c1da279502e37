"""Cancellation, deadlines, admission, registry liveness, health, reflection and the command line."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import structlog
from gateway_fakes import Knobs, cluster, expected_output
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import gateway.attempt
import gateway.pipeline
from protos.splitserve.internal.v1 import worker_pb2
from protos.splitserve.v1 import generation_pb2

ROOT = Path(__file__).resolve().parents[2]
PROMPT = list(range(10, 30))


def request(max_new_tokens: int, request_id: str = "", prompt: list[int] = PROMPT) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt,
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens),
    )


async def eventually(condition, timeout_s: float) -> float:  # noqa: ANN001
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_client_cancel_reaches_both_workers_within_a_second(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, prefill=[Knobs(delay_s=10)]) as c:
        call = c.stub.GenerateStream(request(8, "bye"))
        await eventually(lambda: c.prefills[0].requests and c.decodes[0].requests, 2.0)
        call.cancel()
        waited = await eventually(lambda: "bye" in [r for r, _ in c.prefills[0].cancels + c.decodes[0].cancels]
                                  and all(w.cancelled("bye") for w in c.prefills + c.decodes), 1.0)
        assert {r for r, _ in c.decodes[0].cancels} == {"bye"} and {r for r, _ in c.prefills[0].cancels} == {"bye"}
        assert waited < 1.0
        assert c.gateway.metrics.inflight._value.get() == 0


async def test_deadline_exceeded_cancels_the_workers(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.1)]) as c:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.stub.Generate(request(50, "late"), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: c.decodes[0].cancelled("late") and c.prefills[0].cancelled("late"), 1.0)
        assert "late" not in c.decodes[0].completed
        assert 0 < c.decodes[0].time_remaining[0] <= 0.5, "the worker call did not get the client's deadline"
        assert 0 < c.prefills[0].time_remaining[0] <= 0.5


async def test_gateway_deadline_ends_with_deadline_exceeded(model_dir: Path, vocab_size: int) -> None:
    """The gateway's own timer (here it fires before the client's): the status is the gateway's."""
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.1)]) as c:
        run = c.gateway.pipeline.run(request(50, "own-timer"), _ignore, timeout_s=0.3)
        with pytest.raises(Exception) as error:
            await run
        assert getattr(error.value, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in str(error.value)
        await eventually(lambda: c.decodes[0].cancelled("own-timer"), 1.0)


async def _ignore(delta: object) -> None:
    return None


async def test_admission_limit(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.05)], max_inflight=2) as c:
        calls = [c.stub.GenerateStream(request(10)) for _ in range(2)]
        for call in calls:
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.stub.Generate(request(2))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in error.value.details()
        for call in calls:
            while await call.read() is not grpc.aio.EOF:
                pass
        response = await c.stub.Generate(request(2))
        assert list(response.token_ids) == expected_output(PROMPT, 2, vocab_size)


async def test_request_id_already_in_flight(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.05)]) as c:
        first = c.stub.GenerateStream(request(10, "twice"))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.stub.Generate(request(2, "twice"))
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        first.cancel()


async def test_no_decode_worker_is_unavailable(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, decode=[]) as c:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.stub.Generate(request(2))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no decode worker" in error.value.details()


async def test_worker_without_heartbeat_is_not_picked_after_its_ttl(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, decode=[Knobs(), Knobs()]) as c:
        quiet, alive = c.decodes
        quiet.stop_heartbeat()
        await eventually(lambda: c.gateway.registry.get(quiet.worker_id) is None, 2.0)
        responses = await asyncio.gather(*(c.stub.Generate(request(2)) for _ in range(10)))
        assert {r.decode_worker for r in responses} == {alive.worker_id}
        assert quiet.requests == []


async def test_registry_entry_vanishing_mid_stream_moves_the_request(model_dir: Path, vocab_size: int) -> None:
    busy = worker_pb2.WorkerLoad(num_kv_blocks=100, used_kv_blocks=90)
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.1)]) as c:
        spare = await c.add("decode", load=busy)
        await c.gateway.registry.refresh()
        call = c.stub.GenerateStream(request(40, "moves"))
        first = await call.read()
        c.decodes[0].stop_heartbeat()
        messages = [first]
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    assert [t for m in messages for t in m.token_ids] == expected_output(PROMPT, 40, vocab_size)
    assert messages[-1].decode_worker == spare.worker_id
    assert spare.requests[0].sampling.max_new_tokens < 35
    assert c.decodes[0].cancelled("moves")


async def test_health_and_reflection(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size) as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        for service in ("", "splitserve.v1.Generation"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "splitserve.v1.Generation" in names and "grpc.health.v1.Health" in names
        await c.decodes[0].kill()
        generation = health_pb2.HealthCheckRequest(service="splitserve.v1.Generation")

        async def not_serving() -> bool:
            return (await health.Check(generation)).status == health_pb2.HealthCheckResponse.NOT_SERVING

        deadline = time.monotonic() + 3
        while not await not_serving():
            assert time.monotonic() < deadline, "Generation stayed SERVING with no decode worker"
            await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_count_requests_and_tokens(model_dir: Path, vocab_size: int) -> None:
    port = free_port()
    async with cluster(model_dir, vocab_size, metrics_port=port) as c:
        await c.stub.Generate(request(4))
        with pytest.raises(grpc.aio.AioRpcError):
            await c.stub.Generate(request(0))
        registry = c.gateway.metrics.registry
        assert registry.get_sample_value("splitserve_gateway_requests_total", {"code": "OK"}) == 1
        assert registry.get_sample_value("splitserve_gateway_requests_total", {"code": "INVALID_ARGUMENT"}) == 1
        assert registry.get_sample_value("splitserve_gateway_ttft_seconds_count") == 1
        assert registry.get_sample_value("splitserve_gateway_prefill_tokens_total", {"role": "prefill"}) == 20
        assert registry.get_sample_value("splitserve_gateway_kv_transfer_bytes_total") == 20_000
        url = f"http://127.0.0.1:{port}/metrics"
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert 'splitserve_gateway_requests_total{code="OK"} 1.0' in page


async def test_every_log_line_of_a_request_carries_its_id(
    model_dir: Path, vocab_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with cluster(model_dir, vocab_size, prefill=[Knobs(fail=True)]) as c:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            for module in (gateway.pipeline, gateway.attempt):  # fresh loggers: others may have been cached
                monkeypatch.setattr(module, "log", structlog.get_logger("gateway"))
            await c.stub.Generate(request(3, "logged"))
    events = [e for e in logs if e.get("event") in {"request received", "prefill failed; the decode worker "
                                                    "recomputes the prompt", "request done"}]
    assert len(events) == 3
    assert all(e.get("request_id") == "logged" for e in events)


@pytest.mark.parametrize("args", [["--port", "abc"], ["--max-inflight", "0"], ["--log-format", "xml"], ["--bogus"]])
def test_command_line_refuses_a_bad_value_in_one_line(
    model_dir: Path, args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.__main__

    monkeypatch.setattr(gateway.__main__, "configure_logging", lambda *a: None)  # keep structlog's set-up intact
    assert gateway.__main__.main(["--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and args[0] in err


def test_missing_model_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.__main__

    monkeypatch.setattr(gateway.__main__, "configure_logging", lambda *a: None)  # keep structlog's set-up intact
    assert gateway.__main__.main(["--model", str(tmp_path), "--port", "0"]) == 2
    assert "tokenizer.json not found" in capsys.readouterr().err


def test_python_m_gateway_loads_no_torch(model_dir: Path) -> None:
    code = ("import runpy, sys; sys.argv = ['gateway', '--model', sys.argv[1], '--chunk-size', '0']\n"
            "try: runpy.run_module('gateway', run_name='__main__')\n"
            "except SystemExit as e: code = e.code\n"
            "assert not {'torch', 'transformers', 'engine'} & set(sys.modules), 'torch was imported'\n"
            "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "gateway: error: --chunk-size: Input should be greater than or equal to 1 (got '0')"
