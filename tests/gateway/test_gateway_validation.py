"""Bad input is refused with INVALID_ARGUMENT and a message that says what is wrong; the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from gateway_fakes import Knobs, cluster, expected_output

from gateway.validation import InvalidRequest, validate
from protos.splitserve.v1 import generation_pb2

VOCAB = 512        # config.json of the test checkpoint
CONTEXT = 1024     # its max_position_embeddings
S = generation_pb2.SamplingParams


def req(ids: list[int] | None = None, prompt: str = "", sampling: S | None = None,
        request_id: str = "") -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id=request_id, prompt=prompt, prompt_token_ids=ids or [],
                                          sampling=sampling)


BAD = {
    "no prompt": (req(), "no prompt"),
    "both prompt and ids": (req([1, 2], prompt="hello"), "exactly one of prompt and prompt_token_ids"),
    "id past the vocabulary": (req([1, VOCAB]), f"prompt_token_ids[1] = {VOCAB} is out of the vocabulary"),
    "negative id": (req([-1]), "out of the vocabulary"),
    "prompt longer than the context": (req([1] * (CONTEXT + 1)), "the context is 1024 tokens"),
    "prompt fills the context": (req([1] * CONTEXT), "the context is 1024 tokens"),
    "prompt plus max_new_tokens past the context": (req([1] * 1000, sampling=S(max_new_tokens=25)),
                                                    "past the context: at most 24 new tokens fit"),
    "max_new_tokens 0": (req([1], sampling=S(max_new_tokens=0)), "max_new_tokens must be >= 1"),
    "max_new_tokens negative": (req([1], sampling=S(max_new_tokens=-3)), "max_new_tokens must be >= 1"),
    "temperature negative": (req([1], sampling=S(temperature=-0.5)), "temperature must be >= 0"),
    "temperature nan": (req([1], sampling=S(temperature=float("nan"))), "temperature must be >= 0"),
    "top_p 0": (req([1], sampling=S(top_p=0.0)), "top_p must be in (0, 1]"),
    "top_p above 1": (req([1], sampling=S(top_p=1.5)), "top_p must be in (0, 1]"),
    "top_k negative": (req([1], sampling=S(top_k=-1)), "top_k must be >= 0"),
    "empty stop string": (req([1], sampling=S(stop=["ok", ""])), "stop strings must not be empty"),
    "stop token past the vocabulary": (req([1], sampling=S(stop_token_ids=[VOCAB + 5])), "stop_token_ids[0]"),
    "request id too long": (req([1], request_id="x" * 200), "request_id is longer than"),
}


class Encoder:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return self.ids


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_refuses(case: str) -> None:
    request, message = BAD[case]
    with pytest.raises(InvalidRequest) as error:
        validate(request, Encoder([5]), VOCAB, CONTEXT)
    assert message in str(error.value)


def test_prompt_text_that_tokenizes_to_nothing_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="tokenizes to no tokens"):
        validate(req(prompt="\u200b"), Encoder([]), VOCAB, CONTEXT)


def test_validate_fills_in_defaults_and_keeps_stop_strings_for_the_gateway() -> None:
    valid = validate(req([3, 4], sampling=S(stop=["end"], top_k=5)), Encoder([]), VOCAB, CONTEXT)
    assert valid.prompt_token_ids == (3, 4) and len(valid.request_id) == 32
    assert valid.max_new_tokens == 16 and valid.sampling.top_p == 1.0 and valid.sampling.top_k == 5
    assert valid.stop == ("end",) and list(valid.sampling.stop) == []
    assert validate(req([1] * 1020), Encoder([]), VOCAB, CONTEXT).max_new_tokens == 4
    assert validate(req([1] * 1000, sampling=S(max_new_tokens=24)), Encoder([]), VOCAB, CONTEXT).max_new_tokens == 24
    assert validate(req(prompt="hi"), Encoder([7, 8]), VOCAB, CONTEXT).prompt_token_ids == (7, 8)


async def test_gateway_refuses_bad_input_and_keeps_serving(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size) as c:
        for case, (request, message) in sorted(BAD.items()):
            for rpc in (c.stub.Generate, _first_stream_message(c.stub)):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await rpc(request)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
                assert message in error.value.details(), case
        response = await c.stub.Generate(req([5, 6, 7], sampling=S(max_new_tokens=3)))
        assert list(response.token_ids) == expected_output([5, 6, 7], 3, vocab_size)
        text = await c.stub.Generate(req(prompt="The quick brown fox", sampling=S(max_new_tokens=2)))
        assert text.usage.prompt_tokens > 0 and len(text.token_ids) == 2


def _first_stream_message(stub):  # noqa: ANN001, ANN202
    async def call(request: generation_pb2.GenerateRequest) -> None:
        await stub.GenerateStream(request).read()
    return call


async def test_the_lowest_context_wins(model_dir: Path, vocab_size: int) -> None:
    async with cluster(model_dir, vocab_size, max_model_len=200) as c:
        with pytest.raises(grpc.aio.AioRpcError, match="the context is 200 tokens"):
            await c.stub.Generate(req([1] * 200))
        await c.add("decode", Knobs(max_model_len=50))
        await c.gateway.registry.refresh()
        with pytest.raises(grpc.aio.AioRpcError, match="the context is 50 tokens"):
            await c.stub.Generate(req([1] * 60))
        response = await c.stub.Generate(req([1] * 40, sampling=S(max_new_tokens=10)))
        assert len(response.token_ids) == 10
