"""The L2 prefetch plan (engine.weight_prefetch): which weight bytes each projection asks for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from engine.models.registry import build_model
from engine.weight_prefetch import plan_weight_prefetch, projections
from kernels import get_ops


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=200, n_positions=32)
    model = build_model(cfg, get_ops("torch"))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def stream(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int, int]]:
    """(module, first stream byte, end) in the order a step reads the weights."""
    out, start = [], 0
    for m in projections(model):
        size = m.weight.numel() * m.weight.element_size()
        out.append((m, start, start + size))
        start += size
    return out


def test_step_order_is_qkv_o_fc_proj_per_layer_then_the_head(model: torch.nn.Module) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(m)] for m in projections(model)] == [
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ] + ["lm_head"]


@pytest.mark.parametrize("window", [1000, 20_000, 10**9])
def test_every_byte_is_asked_for_once_about_a_window_ahead_and_never_by_its_reader(model: torch.nn.Module,
                                                                                   window: int) -> None:
    spans = stream(model)
    total = spans[-1][2]
    w = min(window, total - max(e - s for _, s, e in spans))
    assert plan_weight_prefetch(model, window) == len(spans)
    asked = np.zeros(total, dtype=np.int64)
    for mod, start, end in spans:
        got = 0
        for address, nbytes in mod.prefetch.ranges:
            owner = [(s, e) for m, s, e in spans if m.weight.data_ptr() <= address < m.weight.data_ptr() + (e - s)]
            assert len(owner) == 1
            lo = owner[0][0] + address - next(m for m, s, e in spans if s == owner[0][0]).weight.data_ptr()
            assert lo + nbytes <= owner[0][1]  # inside one weight
            assert not start <= lo < end  # never its own
            assert (lo - end) % total < w  # within the window past its own end
            asked[lo : lo + nbytes] += 1
            got += nbytes
        assert got <= min(end - start, w)
    want = np.ones(total, dtype=np.int64)
    for _, start, end in spans:  # a weight longer than the window is prefetched only for its first `window` bytes
        want[start + w : end] = 0
    assert np.array_equal(asked, want)


def test_window_zero_turns_it_off(model: torch.nn.Module) -> None:
    plan_weight_prefetch(model, 4096)
    assert plan_weight_prefetch(model, 0) == 0
    assert all(m.prefetch is None for m in projections(model))


def test_the_references_ignore_the_hint(model: torch.nn.Module) -> None:
    ids, positions = torch.tensor([3]), torch.tensor([0])
    from engine.attention import AttentionMetadata, forward_context
    from engine.kv_cache import KVCache, KVLayout, attention_layers

    attn = attention_layers(model)
    cache = KVCache(KVLayout(len(attn), 4, attn[0].num_kv_heads, attn[0].head_dim, torch.float32), 4,
                    torch.device("cpu"))
    cache.bind(model)
    table = torch.zeros(1, 1, dtype=torch.int32)
    md = AttentionMetadata(torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1]), table, 1, 1)
    outs = []
    for window in (0, 4096):
        plan_weight_prefetch(model, window)
        with forward_context(md):
            outs.append(model.compute_logits(model(ids, positions)))
    assert torch.equal(outs[0], outs[1])
