"""CUDA graphs of decode steps (one new token per sequence) at bucketed batch sizes, and of one sequence's
prompt chunk at bucketed token counts.

A decode step of a small model is a few hundred short kernels; launched one by one from Python, the
launches take longer than the GPU work. Each bucket size gets one graph of the model's forward and
logits, captured at start-up over static input buffers; a step of n sequences copies its inputs into
the buffers of the smallest bucket >= n (padding rows write no KV, see ``engine.step_inputs``) and
replays. The decode graphs share one memory pool, captured largest first so the smaller ones reuse its
blocks (the prompt-chunk graphs below have a pool of their own, the same way).

Attention's launch shape is fixed at capture: decode tiles, and the split-KV count chosen for the
longest context the pool can hold (a shorter context fills only the splits it needs, see
kernels/paged_attention_triton.py).

A lone request's prompt (its time to first token) is the other step launches dominate: eager, a layer of
the 8B model on 512 tokens took ~0.7 ms of host time on one H100 machine against ~0.36 ms of GPU work,
mostly Python launch overhead. ``PrefillGraphs`` captures the forward of one sequence's chunk at token
sizes up to the chunk size; a chunk is padded to the next size with a throwaway second sequence (see
``engine.step_inputs``), and only the rows that sample go through the lm_head, eagerly. Chunks of several
sequences run eagerly: a graph's attention grid has a program per sequence it was captured for.
"""

from __future__ import annotations

import time
from bisect import bisect_left

import structlog
import torch

from engine.attention import AttentionMetadata, forward_context
from engine.step_inputs import StepInputs

log = structlog.get_logger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to ``max_num_seqs`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class _GraphSet:
    """One captured forward per size, largest first into one memory pool (the smaller ones reuse its blocks).

    A subclass fills its static buffers with a dummy step of a size (``_prepare``) and runs the forward over
    them (``_forward``); ``_replay`` runs the graph of a size, or without one (CPU tests) the same buffers
    eagerly.
    """

    kind = ""  # the log's name of the sizes

    def __init__(self, model: torch.nn.Module, sizes: list[int], max_seq_len: int, device: torch.device) -> None:
        self.model = model
        self.sizes = sizes  # ascending
        self.max_seq_len = max_seq_len
        self.device = device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def bucket(self, n: int) -> int | None:
        """The smallest size >= ``n`` (the graph a step of ``n`` sequences or tokens runs), or None."""
        i = bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def _prepare(self, size: int) -> None:
        """Fill the static inputs with a dummy step of ``size`` that writes no KV."""
        raise NotImplementedError

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def capture(self) -> None:
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        pool = None
        for size in reversed(self.sizes):
            self._prepare(size)
            self._forward(size)  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            self._graphs[size] = graph
            pool = graph.pool()
        torch.cuda.synchronize(self.device)
        log.info("cuda_graphs_captured", **{self.kind: self.sizes}, seconds=round(time.perf_counter() - start, 2),
                 gib=round((free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**30, 3))

    def _replay(self, size: int) -> torch.Tensor:
        graph = self._graphs.get(size)
        if graph is None:
            return self._forward(size)
        graph.replay()
        return self._outputs[size]


class DecodeGraphs(_GraphSet):
    """Captured decode graphs of one model and KV pool; ``run`` replays the one that fits a step."""

    kind = "batch_sizes"

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_blocks_per_seq: int, max_seq_len: int,
                 device: torch.device) -> None:
        super().__init__(model, graph_batch_sizes(max_num_seqs), max_seq_len, device)
        b = self.sizes[-1]
        # ids, positions, slots, seq_lens as one [4, b] buffer: a step fills it with one copy
        self._inputs = torch.zeros(4, b, dtype=torch.int32, device=device)
        self._input_views = {size: self._inputs[:, :size] for size in self.sizes}  # made once, not per step
        self._query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros(b, max_blocks_per_seq, dtype=torch.int32, device=device)

    def _prepare(self, size: int) -> None:
        self._inputs[2].fill_(-1)  # one token a sequence, not cached, attending to key 0 of block 0
        self._inputs[3].fill_(1)

    def _forward(self, b: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self._inputs[2, :b],
            query_start_loc=self._query_start_loc[:b + 1],
            seq_lens=self._inputs[3, :b],
            block_tables=self._block_tables[:b],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )
        with forward_context(metadata):
            hidden = self.model(self._inputs[0, :b], self._inputs[1, :b])
        return self.model.compute_logits(hidden)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode step whose inputs were built padded to a graph size.

        Without a captured graph (CPU tests of this path) the same buffers run through the model eagerly.
        """
        assert inputs.graph_inputs is not None, "decode graph inputs must be built with pad_to"
        b = inputs.graph_inputs.shape[1]
        n, width = inputs.metadata.block_tables.shape
        self._input_views[b].copy_(inputs.graph_inputs)
        self._block_tables[:n, :width].copy_(inputs.metadata.block_tables)
        logits = self._replay(b)
        return logits if n == b else logits[:n]


def prefill_token_sizes(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, 256, then multiples of 128 up to 1024 and of 256 beyond, up to ``max_tokens`` (always
    included). Below ~256 tokens a layer's GEMMs are bound by the weights' bandwidth, so padding is nearly
    free; above, padding costs compute, hence the finer steps."""
    sizes = [16, 32, 64, 128, 256, *range(384, 1025, 128), *range(1280, max_tokens, 256)]
    return [t for t in sizes if t < max_tokens] + [max_tokens]


class PrefillGraphs(_GraphSet):
    """Captured forwards of one sequence's prompt chunk; ``run`` replays the one that fits a step."""

    kind = "prefill_token_sizes"

    def __init__(self, model: torch.nn.Module, max_tokens: int, max_blocks_per_seq: int, max_seq_len: int,
                 device: torch.device) -> None:
        super().__init__(model, prefill_token_sizes(max_tokens), max_seq_len, device)
        t = self.sizes[-1]
        self._tokens = torch.zeros(3, t, dtype=torch.int32, device=device)  # ids | positions | slots
        self._seq_meta = torch.zeros(5, dtype=torch.int32, device=device)  # seq_lens [2] | query_start_loc [3]
        self._block_tables = torch.zeros(2, max_blocks_per_seq, dtype=torch.int32, device=device)

    def _prepare(self, t: int) -> None:
        # sequence 0: one uncached token attending to key 0 of block 0; the padding sequence: the other t - 1
        self._tokens[2].fill_(-1)
        self._seq_meta.copy_(torch.tensor([1, t - 1, 0, 1, t], dtype=torch.int32))

    def _forward(self, t: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self._tokens[2, :t],
            query_start_loc=self._seq_meta[2:],
            seq_lens=self._seq_meta[:2],
            block_tables=self._block_tables,
            max_query_len=t,  # prompt tiles, no split-KV: any chunk of up to t tokens fits
            max_seq_len=self.max_seq_len,
        )
        with forward_context(metadata):
            return self.model(self._tokens[0, :t], self._tokens[1, :t])

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [t, hidden] of a chunk step built with ``pad_tokens=t`` (rows past the chunk: padding).

        Without a captured graph (CPU tests of this path) the same buffers run through the model eagerly.
        """
        assert inputs.graph_inputs is not None and inputs.graph_seq_meta is not None, \
            "prefill graph inputs must be built with pad_tokens"
        t = inputs.graph_inputs.shape[1]
        n, width = inputs.metadata.block_tables.shape
        if n != 1:
            raise ValueError(f"prefill graphs run one sequence's chunk, got {n} sequences")
        self._tokens[:, :t].copy_(inputs.graph_inputs)
        self._seq_meta.copy_(inputs.graph_seq_meta)
        self._block_tables[:1, :width].copy_(inputs.metadata.block_tables)
        return self._replay(t)
