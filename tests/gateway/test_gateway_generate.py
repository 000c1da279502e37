"""Generate and GenerateStream through the gateway against fake workers: the right tokens, each once,
whichever worker computed which part, and when a prefill fails or a decode worker dies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from gateway_fakes import Knobs, cluster, expected_output
from tokenizers import Tokenizer

from protos.splitserve.internal.v1 import worker_pb2
from protos.splitserve.v1 import generation_pb2

PROMPT = [17, 42, 99, 123, 7, 250, 31, 64, 5, 77, 300, 12, 45, 88, 201, 9, 150, 33, 71, 400]


def request(
    prompt: list[int], max_new_tokens: int, request_id: str = "", **sampling: object
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt,
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, **sampling),
    )


def decode_text(model_dir: Path, ids: list[int]) -> str:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(ids)


async def stream(c, req: generation_pb2.GenerateRequest) -> list[generation_pb2.GenerateStreamResponse]:  # noqa: ANN001
    return [m async for m in c.stub.GenerateStream(req)]


# (prompt length, settings, tokens the prefill worker computes)
PLANS = {
    "all-prefill": (20, dict(max_prefill_chunks=0), 20),
    "split": (20, dict(chunk_size=8, max_prefill_chunks=1), 8),
    "short-all-decode": (3, dict(), 0),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
async def test_generate_gives_the_fake_models_tokens(model_dir: Path, vocab_size: int, plan: str) -> None:
    prompt_len, settings, on_prefill = PLANS[plan]
    prompt = PROMPT[:prompt_len]
    async with cluster(model_dir, vocab_size, **settings) as c:
        response = await c.stub.Generate(request(prompt, 12))
    want = expected_output(prompt, 12, vocab_size)
    assert list(response.token_ids) == want
    assert response.text == decode_text(model_dir, want)
    assert response.finish_reason == "length"
    assert len(response.request_id) == 32
    assert response.usage.prompt_tokens == prompt_len and response.usage.completion_tokens == 12
    assert response.usage.prefill_tokens_on_prefill_worker == on_prefill
    assert response.usage.prefill_tokens_on_decode_worker == prompt_len - on_prefill
    assert response.decode_worker == c.decodes[0].worker_id
    assert response.prefill_worker == (c.prefills[0].worker_id if on_prefill else "")
    sent = c.decodes[0].requests[0]
    assert (sent.num_remote_tokens, sent.request_id) == (on_prefill, response.request_id)
    assert len(c.prefills[0].requests) == (1 if on_prefill else 0)
    assert response.timings.e2e_ms >= response.timings.ttft_ms > 0
    assert response.timings.transfer_bytes == 1000 * on_prefill


@pytest.mark.parametrize("plan", sorted(PLANS))
async def test_stream_gives_the_same_tokens_and_text(model_dir: Path, vocab_size: int, plan: str) -> None:
    prompt_len, settings, on_prefill = PLANS[plan]
    prompt = PROMPT[:prompt_len]
    async with cluster(model_dir, vocab_size, decode=[Knobs(tokens_per_message=3)], **settings) as c:
        messages = await stream(c, request(prompt, 10, request_id="stream-1"))
    want = expected_output(prompt, 10, vocab_size)
    assert [t for m in messages for t in m.token_ids] == want
    assert "".join(m.text for m in messages) == decode_text(model_dir, want)
    assert all(m.request_id == "stream-1" for m in messages)
    last = messages[-1]
    assert last.finish_reason == "length" and not any(m.finish_reason for m in messages[:-1])
    assert last.usage.completion_tokens == 10 and last.usage.prefill_tokens_on_prefill_worker == on_prefill
    assert last.decode_worker == c.decodes[0].worker_id and last.timings.e2e_ms > 0


async def test_32_concurrent_requests(model_dir: Path, vocab_size: int) -> None:
    prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + i)] for i in range(32)]
    async with cluster(model_dir, vocab_size, prefill=[Knobs(), Knobs()], decode=[Knobs(), Knobs()]) as c:
        responses = await asyncio.gather(*(c.stub.Generate(request(p, 8 + i % 5)) for i, p in enumerate(prompts)))
        used = {r.decode_worker for r in responses}, {r.prefill_worker for r in responses if r.prefill_worker}
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        assert list(response.token_ids) == expected_output(prompt, 8 + i % 5, vocab_size)
    assert len({r.request_id for r in responses}) == 32
    assert used == ({d.worker_id for d in c.decodes}, {p.worker_id for p in c.prefills})


@pytest.mark.parametrize("resend_first", [True, False])
async def test_first_token_comes_from_the_prefill_response_once(
    model_dir: Path, vocab_size: int, resend_first: bool
) -> None:
    decode = Knobs(first_delay_s=1.0, resend_first=resend_first)
    async with cluster(model_dir, vocab_size, decode=[decode]) as c:
        start = time.monotonic()
        call = c.stub.GenerateStream(request(PROMPT, 6))
        first = await call.read()
        first_s = time.monotonic() - start
        rest = []
        while (message := await call.read()) is not grpc.aio.EOF:
            rest.append(message)
    want = expected_output(PROMPT, 6, vocab_size)
    assert list(first.token_ids) == want[:1]
    assert first_s < 0.8, "the first token waited for the decode stream"
    assert list(first.token_ids) + [t for m in rest for t in m.token_ids] == want
    assert rest[-1].timings.ttft_ms < 800


async def test_first_token_waits_for_a_late_prefill_response(model_dir: Path, vocab_size: int) -> None:
    """A decode worker that does not repeat output index 0 may finish before the prefill response arrives."""
    prefill, decode = Knobs(respond_delay_s=0.3), Knobs(resend_first=False)
    async with cluster(model_dir, vocab_size, prefill=[prefill], decode=[decode]) as c:
        messages = await stream(c, request(PROMPT, 4))
    assert [t for m in messages for t in m.token_ids] == expected_output(PROMPT, 4, vocab_size)
    assert [len(m.token_ids) for m in messages] == [4, 0]


@pytest.mark.parametrize("failure", [Knobs(fail=True), Knobs(transfer_ok=False)], ids=["rpc-fails", "transfer-fails"])
async def test_prefill_failure_abandons_the_transfer_and_completes(
    model_dir: Path, vocab_size: int, failure: Knobs
) -> None:
    async with cluster(model_dir, vocab_size, prefill=[failure]) as c:
        response = await c.stub.Generate(request(PROMPT, 8, request_id="p-fails"))
    assert list(response.token_ids) == expected_output(PROMPT, 8, vocab_size)
    assert c.decodes[0].abandons == ["p-fails"]
    assert response.usage.prefill_tokens_on_prefill_worker == 0
    assert response.usage.prefill_tokens_on_decode_worker == len(PROMPT)
    assert response.prefill_worker == ""


async def test_decode_worker_dying_mid_stream_is_retried_elsewhere(model_dir: Path, vocab_size: int) -> None:
    busy = worker_pb2.WorkerLoad(num_kv_blocks=100, used_kv_blocks=90)
    async with cluster(model_dir, vocab_size, decode=[Knobs(die_after=3, delay_s=0.01)]) as c:
        spare = await c.add("decode", load=busy)
        await c.gateway.registry.refresh()
        messages = await stream(c, request(PROMPT, 10, request_id="dies"))
    want = expected_output(PROMPT, 10, vocab_size)
    assert [t for m in messages for t in m.token_ids] == want
    assert messages[-1].finish_reason == "length"
    assert messages[-1].decode_worker == spare.worker_id
    retry = spare.requests[0]
    assert list(retry.prompt_token_ids) == PROMPT + want[:3]
    assert retry.sampling.max_new_tokens == 7 and retry.num_remote_tokens == 0
    assert c.gateway.metrics.retries._value.get() == 1


async def test_decode_worker_dying_during_the_prefill(model_dir: Path, vocab_size: int) -> None:
    """The retry computes the whole prompt on the next decode worker; the prefill for the dead one is cancelled."""
    busy = worker_pb2.WorkerLoad(num_kv_blocks=100, used_kv_blocks=90)
    async with cluster(model_dir, vocab_size, prefill=[Knobs(delay_s=0.5)], decode=[Knobs(die_after=0)]) as c:
        spare = await c.add("decode", load=busy)
        await c.gateway.registry.refresh()
        response = await c.stub.Generate(request(PROMPT, 5, request_id="early"))
        await asyncio.sleep(0.2)
    assert list(response.token_ids) == expected_output(PROMPT, 5, vocab_size)
    assert response.decode_worker == spare.worker_id and response.prefill_worker == ""
    assert spare.requests[0].num_remote_tokens == 0 and len(spare.requests[0].prompt_token_ids) == len(PROMPT)
    assert response.usage.prefill_tokens_on_decode_worker == len(PROMPT)
    assert c.prefills[0].cancelled("early") and "early" not in c.prefills[0].completed


async def test_without_prefill_workers_decode_computes_everything(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, prefill=[]) as c:
        response = await c.stub.Generate(request(PROMPT, 5))
    assert list(response.token_ids) == expected_output(PROMPT, 5, vocab_size)
    assert c.decodes[0].requests[0].num_remote_tokens == 0 and response.prefill_worker == ""
    assert response.usage.prefill_tokens_on_decode_worker == len(PROMPT)


async def test_stop_string_ends_the_request_and_cancels_decode(model_dir: Path, vocab_size: int) -> None:
    want = expected_output(PROMPT, 60, vocab_size)
    full = decode_text(model_dir, want)
    stop = next(full[i:i + 3] for i in range(8, len(full)) if full[i:i + 3].isascii() and full[i:i + 3].strip())
    cut = full.index(stop)
    async with cluster(model_dir, vocab_size, decode=[Knobs(delay_s=0.02, tokens_per_message=2)]) as c:
        response = await c.stub.Generate(request(PROMPT, 60, request_id="stops", stop=[stop]))
        await asyncio.sleep(0.3)
    assert response.finish_reason == "stop"
    assert response.text == full[:cut]
    assert len(response.token_ids) < 60 and list(response.token_ids) == want[:len(response.token_ids)]
    assert decode_text(model_dir, list(response.token_ids)).find(stop) == cut
    assert [r for r, _ in c.decodes[0].interrupted] == ["stops"], "the decode stream was not cancelled"
    assert "stops" not in c.decodes[0].completed
