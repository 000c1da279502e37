"""TokenReadback: the host buffers a step's sampled tokens are read through, reused from step to step.

A buffer must never be handed to a new step while the step holding it may still be read, however the
starts and reads of steps in flight interleave. The CPU runs the bookkeeping; the GPU tests add pinned
buffers, events and copies still queued behind device work when the next step takes a buffer.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from engine.model_runner import PendingStep, TokenReadback
from engine.request import Request, SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput


def _interleave(device: torch.device, steps: int, seed: int) -> None:
    """Random starts and reads, up to 3 steps in flight; each read gives back exactly its step's tokens."""
    rng = random.Random(seed)
    readback = TokenReadback(6, device)
    in_flight: list[tuple[list[int], object]] = []
    buffers = set()
    for _ in range(steps):
        if in_flight and (len(in_flight) == 3 or rng.random() < 0.5):
            tokens, host = in_flight.pop(rng.randrange(len(in_flight)))
            assert readback.read(host) == tokens  # type: ignore[arg-type]
        else:
            tokens = [rng.randrange(50_000) for _ in range(rng.randrange(1, 7))]
            if device.type == "cuda":
                torch.cuda._sleep(rng.randrange(100_000))  # the copy waits behind device work
            host = readback.start(torch.tensor(tokens, device=device))
            assert all(host is not other for _, other in in_flight), "a buffer still to be read was handed out"
            in_flight.append((tokens, host))
            buffers.add(id(host))
    assert len(buffers) <= 3  # reused: at most one per step in flight


def test_steps_in_flight_never_share_a_buffer() -> None:
    for seed in range(20):
        _interleave(torch.device("cpu"), 200, seed)


@pytest.mark.gpu
def test_steps_in_flight_never_share_a_pinned_buffer_on_the_gpu() -> None:
    _interleave(torch.device("cuda"), 400, 0)


def test_a_step_larger_than_the_capacity_gets_its_own_buffer() -> None:
    readback = TokenReadback(2, torch.device("cpu"))
    host = readback.start(torch.arange(5))
    assert readback.read(host) == [0, 1, 2, 3, 4]
    assert readback.read(readback.start(torch.arange(3))) == [0, 1, 2]


def test_pending_step_reads_once_and_puts_none_where_nothing_sampled() -> None:
    readback = TokenReadback(4, torch.device("cpu"))
    runner = SimpleNamespace(token_readback=readback, last_device_wait_s=-1.0)
    requests = [Request(f"r{i}", [1, 2, 3], SamplingParams()) for i in range(3)]
    output = SchedulerOutput(tuple(ScheduledRequest(r, 1, 2, i != 1) for i, r in enumerate(requests)), (), 3)
    sampled = torch.tensor([7, 9])
    pending = PendingStep(runner, output, sampled, sampled, False, readback.start(sampled))  # type: ignore[arg-type]
    first = pending.wait()
    assert first.sampled_token_ids == [7, None, 9] and runner.last_device_wait_s >= 0
    again = readback.start(torch.tensor([1, 2]))  # takes the buffer the step gave back
    assert pending.wait() is first and first.sampled_token_ids == [7, None, 9]
    assert readback.read(again) == [1, 2]
