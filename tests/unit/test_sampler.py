"""Sampler and top-k / top-p masking on crafted distributions, with fixed seeds (CPU)."""

from __future__ import annotations

import math

import torch

from engine.request import SamplingParams
from engine.sampler import Sampler, apply_top_k_top_p, make_sampling_batch


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], output_index: list[int] | None = None, seed: int = 0
) -> torch.Tensor:
    batch = make_sampling_batch(params, output_index or [0] * len(params), logits.device)
    return Sampler(seed)(logits, batch)


def _repeat(row: list[float], n: int) -> torch.Tensor:
    return torch.tensor(row, dtype=torch.float32).expand(n, -1).contiguous()


def _log_probs(probs: list[float], order: list[int]) -> list[float]:
    """Logits whose softmax puts probs[i] on token order[i]."""
    logits = [0.0] * len(order)
    for p, token in zip(probs, order, strict=True):
        logits[token] = math.log(p)
    return logits


def _allowed(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]


def test_make_sampling_batch_fields() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=3),
        SamplingParams(temperature=0.7, seed=9),
        SamplingParams(temperature=1.0, top_p=0.9),
    ]
    batch = make_sampling_batch(params, [4, 5, 6], "cpu")
    assert batch.temperature.dtype == torch.float32 and batch.top_p.dtype == torch.float32
    assert batch.top_k.dtype == torch.int64
    assert batch.top_k.tolist() == [5, 0, 0]
    assert torch.allclose(batch.temperature, torch.tensor([0.0, 0.7, 1.0]))
    assert (batch.all_greedy, batch.any_top_k, batch.any_top_p) == (False, False, True)
    assert batch.seeds == (None, 9, None)
    assert batch.output_index == (4, 5, 6)
    assert make_sampling_batch([SamplingParams()] * 2, [0, 0], "cpu").all_greedy


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(16, 97, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    tokens = _sample(logits, [SamplingParams()] * 16)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.float().argmax(-1))


def test_greedy_rows_in_a_sampled_batch_equal_argmax() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.0 if i % 2 else 5.0, top_k=3, seed=i) for i in range(64)]
    tokens = _sample(logits, params)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(256, 100, generator=torch.Generator().manual_seed(3))
    tokens = _sample(logits, [SamplingParams(temperature=1e-4)] * 256)
    assert torch.equal(tokens, logits.argmax(-1))


def test_same_seed_and_output_index_repeat_exactly() -> None:
    logits = torch.zeros(64, 1000)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(64)]
    first = _sample(logits, params, list(range(64)), seed=0)
    again = _sample(logits, params, list(range(64)), seed=12345)
    assert torch.equal(first, again)
    assert len(set(first.tolist())) > 50
    shifted = _sample(logits, params, [i + 1 for i in range(64)])
    assert (shifted != first).sum() > 50


def test_same_seed_differs_across_output_index() -> None:
    logits = torch.zeros(200, 1000)
    tokens = _sample(logits, [SamplingParams(temperature=1.0, seed=7)] * 200, list(range(200)))
    assert len(set(tokens.tolist())) > 150


def test_seeded_row_ignores_batch_position_and_composition() -> None:
    row_logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(4))
    row_params = [SamplingParams(temperature=1.3, top_p=0.95 if i % 3 else 1.0, seed=100 + i) for i in range(32)]
    alone = _sample(row_logits, row_params, list(range(32)))
    fillers = [SamplingParams(temperature=0.5, top_k=2), SamplingParams(), SamplingParams(temperature=2.0, top_p=0.3)]
    filler_logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(32, generator=torch.Generator().manual_seed(6)).tolist()
    logits = torch.cat([filler_logits, row_logits[order]])
    mixed = _sample(logits, fillers + [row_params[i] for i in order], [9, 9, 9] + order, seed=77)
    assert torch.equal(mixed[3:], alone[order])


def test_top_k_never_leaves_the_k_best() -> None:
    logits = _repeat([0.1, 2.0, -1.0, 1.9, 0.5, 1.8, 0.0, 1.7], 4096)
    tokens = _sample(logits, [SamplingParams(temperature=1.0, top_k=3)] * 4096)
    assert set(tokens.tolist()) == {1, 3, 5}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = _repeat(_log_probs([0.5, 0.3, 0.15, 0.05], [2, 0, 3, 1]), 4096)
    at_80 = _sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)] * 4096)
    at_81 = _sample(logits, [SamplingParams(temperature=1.0, top_p=0.81)] * 4096)
    assert set(at_80.tolist()) == {2, 0}
    assert set(at_81.tolist()) == {2, 0, 3}


def test_top_p_applies_to_what_top_k_left() -> None:
    logits = _repeat(_log_probs([0.4, 0.3, 0.2, 0.1], [0, 1, 2, 3]), 4096)
    top_p_only = _sample(logits, [SamplingParams(temperature=1.0, top_p=0.5)] * 4096)
    both = _sample(logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.5)] * 4096)
    assert set(top_p_only.tolist()) == {0, 1}
    assert set(both.tolist()) == {0}


def test_apply_top_k_top_p_per_row() -> None:
    logits = _repeat(_log_probs([0.4, 0.3, 0.2, 0.06, 0.04], [4, 3, 2, 1, 0]), 6)
    top_k = torch.tensor([0, 1, 3, 0, 0, 4])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.7, 0.71, 0.65])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    assert _allowed(masked) == [{0, 1, 2, 3, 4}, {4}, {2, 3, 4}, {3, 4}, {2, 3, 4}, {3, 4}]
    assert torch.equal(masked[torch.isfinite(masked)], logits[torch.isfinite(masked)])
    assert _allowed(apply_top_k_top_p(logits, top_k, None))[2:4] == [{2, 3, 4}, {0, 1, 2, 3, 4}]
    assert _allowed(apply_top_k_top_p(logits, None, top_p))[1:4] == [{0, 1, 2, 3, 4}] * 2 + [{3, 4}]


def test_top_p_always_keeps_the_top_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 3.0, 3.0]])
    masked = apply_top_k_top_p(logits, None, torch.tensor([1e-9, 1e-9]))
    assert [len(s) for s in _allowed(masked)] == [1, 1]
    assert _allowed(masked)[0] == {1}


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_frequencies_match_softmax_over_temperature() -> None:
    row = [1.0, 0.2, -0.5, 0.7, 0.0]
    probs = torch.softmax(torch.tensor(row) / 0.7, dim=-1)
    unseeded = _sample(_repeat(row, 20000), [SamplingParams(temperature=0.7)] * 20000, seed=1)
    seeded_params = [SamplingParams(temperature=0.7, seed=s) for s in range(4000)]
    seeded = _sample(_repeat(row, 4000), seeded_params)
    assert _chi_square(unseeded, probs) < 25.0
    assert _chi_square(seeded, probs) < 25.0
    assert _chi_square(unseeded, torch.softmax(torch.tensor(row), dim=-1)) > 100.0
