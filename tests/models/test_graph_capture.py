"""The capture and replay bookkeeping of engine.cuda_graphs on the CPU, with torch.cuda's graph API faked.

A real capture needs CUDA (tests/models/test_cuda_graphs_gpu.py); here each fake capture runs the forward
eagerly and records what the static buffers held, which checks the orchestration CI can see: sizes captured
largest first into one chained pool, the dummy step of each size writing no KV, and a step replaying the
graph of its size and getting that graph's output back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from engine.engine import Engine
from engine.request import SamplingParams


class FakeGraph:
    def __init__(self) -> None:
        self.replays = 0

    def pool(self) -> tuple[str, int]:
        return ("pool", id(self))

    def replay(self) -> None:
        self.replays += 1


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each fake capture saw: its pool and the static inputs' values when it began."""
    seen: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    @contextlib.contextmanager
    def graph(g: FakeGraph, pool: Any = None) -> Iterator[None]:
        seen.append({"graph": g, "pool": pool, **{k: v() for k, v in current.items()}})
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    seen.append(current)  # seen[0]: the probes a test registers; the captures follow
    return seen


def _engine(ckpt: Any) -> Engine:
    return Engine(EngineConfig(model=str(ckpt), dtype="float32", block_size=4, num_kv_blocks=48,
                               max_num_batched_tokens=48, prefill_chunk_size=40, max_num_seqs=4))


def _check_chain(records: list[dict[str, Any]], sizes: list[int], graphs: Any) -> None:
    assert [r["size"] for r in records] == sorted(sizes, reverse=True)  # largest first
    assert records[0]["pool"] is None
    for before, after in zip(records, records[1:], strict=False):  # every later one into the first's pool chain
        assert after["pool"] == before["graph"].pool()
    assert {size: graphs._graphs[size] for size in sizes} == {r["size"]: r["graph"] for r in records}


def test_decode_graphs_capture_and_replay(make_checkpoint: Any, captures: list[dict[str, Any]]) -> None:
    eng = _engine(make_checkpoint("llama"))
    r = eng.runner
    graphs = DecodeGraphs(r.model, 4, r.builder.max_blocks_per_seq, r.max_seq_len, r.device)
    batches: list[int] = []
    forward = graphs._forward
    graphs._forward = lambda b: (batches.append(b), forward(b))[1]  # type: ignore[method-assign]
    probes = captures[0]
    probes["size"] = lambda: batches[-1]  # each capture follows its size's warm-up forward
    probes["slots"] = lambda: graphs._inputs[2].tolist()
    probes["seq_lens"] = lambda: graphs._inputs[3].tolist()
    graphs.capture()
    records = captures[1:]
    _check_chain(records, [1, 2, 4], graphs)
    assert batches == [4, 4, 2, 2, 1, 1]  # per size a warm-up, then the captured forward
    assert all(rec["slots"] == [-1] * 4 and rec["seq_lens"] == [1] * 4 for rec in records)  # dummies cache nothing
    r.graphs = graphs
    eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.add_request([8, 9], SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.step()  # the prompts, eagerly
    scheduled = eng.scheduler.schedule()
    assert scheduled.is_decode and scheduled.num_seqs == 2
    inputs = r.build_inputs(scheduled, 2, ahead=False)
    logits = graphs.run(inputs)
    assert graphs._graphs[2].replays == 1 and graphs._graphs[4].replays == 0
    assert logits.data_ptr() == graphs._outputs[2].data_ptr()  # the captured output, not a new forward
    assert graphs._inputs[2, :2].tolist() == inputs.metadata.slot_mapping.tolist()  # the step's inputs copied in


def test_prefill_graphs_capture_and_replay(make_checkpoint: Any, captures: list[dict[str, Any]]) -> None:
    eng = _engine(make_checkpoint("gpt2"))
    r = eng.runner
    graphs = PrefillGraphs(r.model, r.max_prefill_graph_tokens, r.builder.max_blocks_per_seq, r.max_seq_len,
                           r.device)
    probes = captures[0]
    probes["size"] = lambda: int(graphs._seq_meta[4])
    probes["seq_meta"] = lambda: graphs._seq_meta.tolist()
    probes["slots"] = lambda: graphs._tokens[2].tolist()
    graphs.capture()
    records = captures[1:]
    _check_chain(records, [16, 32, 40], graphs)
    for rec in records:
        t = rec["size"]
        assert rec["seq_meta"] == [1, t - 1, 0, 1, t]  # one token, then the padding sequence
        assert rec["slots"] == [-1] * 40  # the dummy step caches nothing
    r.prefill_graphs = graphs
    eng.add_request(list(range(1, 22)), SamplingParams(max_new_tokens=1, ignore_eos=True))
    scheduled = eng.scheduler.schedule()
    assert scheduled.num_seqs == 1 and scheduled.num_batched_tokens == 21
    inputs = r.build_inputs(scheduled, None, ahead=False, pad_tokens=graphs.bucket(21))
    hidden = graphs.run(inputs)
    assert graphs._graphs[32].replays == 1 and graphs._graphs[40].replays == 0
    assert hidden.data_ptr() == graphs._outputs[32].data_ptr()
    assert graphs._seq_meta.tolist() == [21, 11, 0, 21, 32]
    assert graphs._tokens[0, :21].tolist() == list(range(1, 22))
