"""Checks one GenerateRequest and turns it into what the workers get: token ids and complete sampling params."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol

from protos.splitserve.v1 import generation_pb2

DEFAULT_MAX_NEW_TOKENS = 16
MAX_REQUEST_ID_LEN = 128


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class InvalidRequest(ValueError):
    """Bad client input; the message says what to fix (sent back with INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ValidRequest:
    """A checked request. ``sampling`` is what workers get: max_new_tokens set, stop strings removed
    (the gateway enforces them); ``stop`` keeps them for the gateway's detokenizer."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: generation_pb2.SamplingParams
    stop: tuple[str, ...]

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens


def validate(
    request: generation_pb2.GenerateRequest, tokenizer: Encoder, vocab_size: int, max_model_len: int
) -> ValidRequest:
    """Raises InvalidRequest for bad input; ``max_model_len`` is the usable context in tokens."""
    request_id = request.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_LEN} characters")
    prompt = _prompt_token_ids(request, tokenizer, vocab_size)
    if len(prompt) >= max_model_len:
        raise InvalidRequest(f"the prompt has {len(prompt)} tokens; the context is {max_model_len} tokens "
                             "and at least one must be left for the output")
    sampling = _sampling(request.sampling, vocab_size, max_model_len - len(prompt))
    stop = tuple(sampling.stop)
    del sampling.stop[:]
    return ValidRequest(request_id, tuple(prompt), sampling, stop)


def _prompt_token_ids(request: generation_pb2.GenerateRequest, tokenizer: Encoder, vocab_size: int) -> list[int]:
    if request.prompt and request.prompt_token_ids:
        raise InvalidRequest("give exactly one of prompt and prompt_token_ids, not both")
    if request.prompt:
        ids = tokenizer.encode(request.prompt)
        if not ids:
            raise InvalidRequest("the prompt text tokenizes to no tokens")
        return ids
    if not request.prompt_token_ids:
        raise InvalidRequest("no prompt: give prompt or prompt_token_ids")
    _check_ids("prompt_token_ids", request.prompt_token_ids, vocab_size)
    return list(request.prompt_token_ids)


def _check_ids(name: str, ids: list[int], vocab_size: int) -> None:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"{name}[{i}] = {token_id} is out of the vocabulary [0, {vocab_size})")


def _sampling(params: generation_pb2.SamplingParams, vocab_size: int, room: int) -> generation_pb2.SamplingParams:
    """``room`` is how many tokens fit after the prompt; an unset max_new_tokens becomes min(16, room)."""
    out = generation_pb2.SamplingParams()
    out.CopyFrom(params)
    if not params.HasField("max_new_tokens"):
        out.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
    elif params.max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    elif params.max_new_tokens > room:
        raise InvalidRequest(f"the prompt plus max_new_tokens = {params.max_new_tokens} is past the context: "
                             f"at most {room} new tokens fit")
    if not params.temperature >= 0 or math.isinf(params.temperature):
        raise InvalidRequest(f"temperature must be >= 0, got {params.temperature}")
    if params.HasField("top_p") and not 0 < params.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
    if not params.HasField("top_p"):
        out.top_p = 1.0
    if params.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {params.top_k}")
    if any(not s for s in params.stop):
        raise InvalidRequest("stop strings must not be empty")
    _check_ids("stop_token_ids", params.stop_token_ids, vocab_size)
    return out
