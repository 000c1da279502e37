"""Picks one token per row of logits on device: greedy, temperature, top-k, top-p and per-request seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.request import SamplingParams

_SEED_STRIDE = 1_000_003
_SEED_MASK = (1 << 63) - 1
_TOP_P_EPS = 1e-6


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings for one step, tensors already on the logits' device.

    ``temperature`` float32 [B] (0 = greedy), ``top_k`` int64 [B] (0 = off), ``top_p`` float32 [B]
    (1 = off). ``seeds[i]`` is the request seed, or None when unseeded or greedy.
    ``output_index[i]`` is how many tokens row i's request has output so far; with the seed it
    fixes the row's noise, so a seeded request repeats exactly across batches and preemption.
    ``any_top_k`` / ``any_top_p`` only count sampled (non-greedy) rows. An all-greedy batch
    carries empty tensors and no seeds (argmax needs none of them).
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    seeds: tuple[int | None, ...]
    output_index: tuple[int, ...]


def make_sampling_batch(
    params: Sequence[SamplingParams], output_index: Sequence[int], device: torch.device | str
) -> SamplingBatch:
    """Builds the step's batch with one host-to-device copy per tensor."""
    if len(params) != len(output_index):
        raise ValueError(f"{len(params)} params but {len(output_index)} output indices")
    sampled = [p for p in params if not p.greedy]
    if not sampled:  # greedy needs no per-row settings: no tensors, no copies
        return ALL_GREEDY
    device = torch.device(device)
    return SamplingBatch(
        temperature=_to_device([p.temperature for p in params], torch.float32, device),
        top_k=_to_device([p.top_k for p in params], torch.int64, device),
        top_p=_to_device([p.top_p for p in params], torch.float32, device),
        all_greedy=not sampled,
        any_top_k=any(p.top_k > 0 for p in sampled),
        any_top_p=any(p.top_p < 1 for p in sampled),
        seeds=tuple(None if p.greedy else p.seed for p in params),
        output_index=tuple(output_index),
    )


_NONE = torch.empty(0)
ALL_GREEDY = SamplingBatch(_NONE, _NONE, _NONE, True, False, False, (), ())


def _to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Returns a copy of ``logits`` [B, V] with -inf outside each row's allowed set.

    Top-k keeps the k highest logits (exactly k; ties broken by a stable sort), 0 = off.
    Top-p then works on the renormalised survivors: it keeps the smallest set of most probable
    tokens whose probability sums to at least p (within 1e-6, so float error cannot drop a token
    that reaches p exactly), and always the top token; p >= 1 = off. None skips a filter.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:
        sorted_logits = _mask_top_k(sorted_logits, top_k)
    if top_p is not None:
        sorted_logits = _mask_top_p(sorted_logits, top_p)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _mask_top_k(sorted_logits: Tensor, top_k: Tensor) -> Tensor:
    vocab_size = sorted_logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab_size).unsqueeze(1)
    positions = torch.arange(vocab_size, device=sorted_logits.device)
    return sorted_logits.masked_fill(positions >= k, float("-inf"))


def _mask_top_p(sorted_logits: Tensor, top_p: Tensor) -> Tensor:
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    outside = mass_above >= (top_p - _TOP_P_EPS).unsqueeze(1)
    outside &= (top_p < 1).unsqueeze(1)
    outside[:, 0] = False
    return sorted_logits.masked_fill(outside, float("-inf"))


class Sampler:
    """Samples with the exponential trick (argmax of probs / Exp(1) noise): no host sync.

    Seeded rows draw their noise from a generator seeded by ``(seed, output_index)`` alone, so
    their tokens do not depend on the rest of the batch. Unseeded rows share one generator per
    device, seeded from ``seed`` and created on first use.
    """

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Returns int64 token ids [B] on the logits' device for logits [B, V]."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        sampled = self._sample(logits, batch)
        return torch.where(batch.temperature == 0, greedy, sampled)

    def _sample(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        logits = logits / temperature.unsqueeze(1)
        if batch.any_top_k or batch.any_top_p:
            top_k = batch.top_k if batch.any_top_k else None
            top_p = batch.top_p if batch.any_top_p else None
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        return probs.div_(self._noise(probs, batch)).argmax(dim=-1)

    def _noise(self, probs: Tensor, batch: SamplingBatch) -> Tensor:
        noise = torch.empty_like(probs)
        seeded = [(i, seed) for i, seed in enumerate(batch.seeds) if seed is not None]
        if len(seeded) < len(batch.seeds):
            noise.exponential_(generator=self._generator(probs.device))
        for i, seed in seeded:
            noise[i].exponential_(generator=_row_generator(seed, batch.output_index[i], probs.device))
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]


def _row_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * _SEED_STRIDE + output_index) & _SEED_MASK)
