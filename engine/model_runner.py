"""Turns a SchedulerOutput into tensors, runs the model over the flat batch (or replays a graph), and samples.

Start-up on a GPU: weights, then a profile of the largest eager step and, with graphs, of the largest decode
step and the largest graphed prompt chunk (their activation peaks are kept free), then the KV pool, sized as
``kv_cache_memory_fraction`` of the free memory left, then the decode graphs and the one-sequence
prompt-chunk graphs (``enable_cuda_graph``, ``cuda_graph_steps``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from engine.attention import forward_context
from engine.config import EngineConfig, torch_dtype
from engine.cuda_graphs import DecodeGraphs, PrefillGraphs, graph_batch_sizes
from engine.kv_cache import KVCache, KVLayout, attention_layers
from engine.models.loader import iter_weights
from engine.models.registry import build_model
from engine.request import Request, SamplingParams
from engine.sampler import ALL_GREEDY, Sampler, SamplingBatch, make_sampling_batch
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.step_inputs import InputBuilder, StepInputs
from kernels import get_ops

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ModelOutput:
    sampled_token_ids: list[int | None]  # one per scheduled request, None where it did not sample
    logits: torch.Tensor  # [number of sampling requests, vocab] float32, in scheduled order
    cuda_graph: bool = False  # the step replayed a CUDA graph (decode, or a one-sequence prompt chunk)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(name)


class ModelRunner:
    """Owns the model, the KV pool, the step inputs, the decode graphs and the sampler of one rank."""

    def __init__(self, config: EngineConfig, hf_config: Any, weights: Any, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.enable_cuda_graph and self.device.type != "cuda":
            raise ValueError("enable_cuda_graph needs a CUDA device; this engine runs on the CPU")
        ckpt_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        self.dtype = torch_dtype(config.resolve_dtype(self.device.type, _dtype_name(ckpt_dtype)))
        backend = "triton" if config.use_kernels(self.device.type) else "torch"
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        self.pdl = config.use_pdl(self.device.type, capability)
        self.model = self._build(hf_config, backend, weights)
        log.info("model_built", ops=backend, pdl=self.pdl, dtype=str(self.dtype).removeprefix("torch."),
                 device=str(self.device))
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler(config.seed)
        self.token_readback = TokenReadback(config.max_num_seqs, self.device)
        self.last_device_wait_s = 0.0  # how long the last PendingStep.wait() waited for the device (its one sync)
        attn = attention_layers(self.model)
        self.kv_layout = KVLayout(len(attn), config.block_size, attn[0].num_kv_heads, attn[0].head_dim, self.dtype)
        self.max_model_len = max_model_len
        self.builder = self._input_builder(-(-max_model_len // config.block_size))
        self.kv_cache = self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if config.captures_decode_graphs:
            self.graphs = DecodeGraphs(self.model, config.max_num_seqs, self.builder.max_blocks_per_seq,
                                       self.max_seq_len, self.device)
            self.graphs.capture()
        if config.captures_prefill_graphs:
            self.prefill_graphs = PrefillGraphs(self.model, self.max_prefill_graph_tokens,
                                                self.builder.max_blocks_per_seq, self.max_seq_len, self.device)
            self.prefill_graphs.capture()

    def _build(self, hf_config: Any, backend: str, weights: Any) -> torch.nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = build_model(hf_config, get_ops(backend, pdl=self.pdl))  # type: ignore[arg-type]
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(weights if weights is not None else iter_weights(self.config.model))
        return model.eval()

    def _input_builder(self, max_blocks_per_seq: int) -> InputBuilder:
        return InputBuilder(self.config.max_num_seqs, self.config.max_num_batched_tokens, max_blocks_per_seq,
                            self.config.block_size, self.device)

    @property
    def max_prefill_graph_tokens(self) -> int:
        """The largest one-sequence chunk a prefill graph is captured for: a chunk, at most 2048 tokens (beyond,
        a step's GPU work dwarfs its launches)."""
        return min(self.config.prefill_chunk_size, self.max_model_len, 2048)

    @property
    def max_seq_len(self) -> int:
        return min(self.max_model_len, self.kv_cache.num_blocks * self.config.block_size)

    def _allocate_kv_cache(self) -> KVCache:
        layout = self.kv_layout
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit(layout)
        cache = KVCache(layout, num_blocks, self.device)
        cache.bind(self.model)
        if num_blocks < self.builder.max_blocks_per_seq:  # no sequence can outgrow the pool: narrower tables
            self.builder = self._input_builder(num_blocks)
        log.info("kv_cache_allocated", blocks=num_blocks, tokens=num_blocks * layout.block_size,
                 gib=round(cache.nbytes / 2**30, 3), device=str(self.device))
        return cache

    def _blocks_that_fit(self, layout: KVLayout) -> int:
        if self.device.type == "cuda":
            budget = self._gpu_kv_budget(layout)
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        blocks = int(budget // layout.bytes_per_block())
        if blocks < 1:
            raise RuntimeError("no memory left for one KV-cache block; use a smaller model or a larger KV budget")
        return blocks

    def _gpu_kv_budget(self, layout: KVLayout) -> float:
        """``kv_cache_memory_fraction`` of the memory free after the weights, the activation peak of the
        largest eager step and (with graphs) of the largest decode step, measured by running them."""
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        cfg = self.config
        # the largest eager step the scheduler can form: max_num_seqs sequences, each at most a chunk (and the context)
        seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        tokens = min(cfg.max_num_batched_tokens, seqs * min(cfg.prefill_chunk_size, self.max_model_len))
        eager_peak = self._profile_peak(tokens, seqs)
        graph_peak = 0
        if cfg.captures_decode_graphs:  # one decode step's activations (the graphs share a pool) + every graph's logits
            held_logits = sum(graph_batch_sizes(cfg.max_num_seqs)) * self.vocab_size * self.dtype.itemsize
            graph_peak = self._profile_peak(cfg.max_num_seqs, cfg.max_num_seqs) + held_logits
        if cfg.captures_prefill_graphs:  # the prefill graphs' own pool: the activations of the largest chunk they run
            graph_peak += self._profile_peak(self.max_prefill_graph_tokens, 1)
        budget = cfg.kv_cache_memory_fraction * (free - eager_peak - graph_peak)
        log.info("kv_cache_budget", free_gib=round(free / 2**30, 2), eager_peak_gib=round(eager_peak / 2**30, 3),
                 graph_peak_gib=round(graph_peak / 2**30, 3), fraction=cfg.kv_cache_memory_fraction,
                 kv_gib=round(budget / 2**30, 2))
        return budget

    @torch.inference_mode()
    def _profile_peak(self, num_tokens: int, num_seqs: int) -> int:
        """Peak bytes a step of ``num_tokens`` tokens over ``num_seqs`` sampled sequences allocates beyond
        what is held now (the step runs against a throwaway KV pool just big enough for it; its kernels
        are compiled on the way, so the first request pays no JIT)."""
        bs = self.config.block_size
        per_seq = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        blocks = [-(-n // bs) for n in per_seq]
        scratch = KVCache(self.kv_layout, sum(blocks), self.device)
        scratch.bind(self.model)
        scheduled, first = [], 0
        for i, n in enumerate(per_seq):
            request = Request(f"profile-{i}", [0] * n, SamplingParams(max_new_tokens=1))
            request.block_ids = list(range(first, first + blocks[i]))
            first += blocks[i]
            scheduled.append(ScheduledRequest(request, n, 0, True))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        held = torch.cuda.memory_allocated(self.device)
        self.execute(SchedulerOutput(tuple(scheduled), (), num_tokens), use_graphs=False)
        peak = torch.cuda.max_memory_allocated(self.device) - held
        del scratch
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, use_graphs: bool = True) -> ModelOutput:
        """Run one step and wait for its tokens."""
        return self.launch(output, use_graphs=use_graphs).wait()

    @torch.inference_mode()
    def launch(self, output: SchedulerOutput, after: PendingStep | None = None, use_graphs: bool = True
               ) -> PendingStep:
        """Queue one step on the device without waiting for it. ``after``: the step before, still running,
        whose sampled tokens are this step's input tokens (``output.ahead``: same requests, same order)."""
        n = output.num_seqs
        bucket = chunk_bucket = None
        if output.is_decode:
            if use_graphs and self.graphs is not None:
                bucket = self.graphs.bucket(n)
        elif use_graphs and self.prefill_graphs is not None and n == 1:
            chunk_bucket = self.prefill_graphs.bucket(output.num_batched_tokens)
        inputs = self.build_inputs(output, bucket, ahead=after is not None, pad_tokens=chunk_bucket)
        if after is not None:
            inputs.input_ids[:n].copy_(after.sampled)  # views the graph inputs too: copied before replay
        if bucket is not None:
            logits = self.graphs.run(inputs)  # type: ignore[union-attr]
            logits = logits.float() if logits.dtype != torch.float32 else logits.clone()  # the graph reuses it
        elif chunk_bucket is not None:
            hidden = self.prefill_graphs.run(inputs)  # type: ignore[union-attr]
            logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        else:
            with forward_context(inputs.metadata):
                hidden = self.model(inputs.input_ids, inputs.positions)
            logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        sampled = self.sampler(logits, self._sampling_batch(output))
        graphed = bucket is not None or chunk_bucket is not None
        return PendingStep(self, output, sampled, logits, graphed, self.token_readback.start(sampled))

    def build_inputs(self, output: SchedulerOutput, pad_to: int | None, ahead: bool,
                     pad_tokens: int | None = None) -> StepInputs:
        """The step's inputs; ``ahead``: its input tokens are written on the device afterwards (``launch``)."""
        if ahead and output.decode is not None:
            return self.builder.build_ahead(output.decode, pad_to)
        return self.builder.build(output.scheduled, pad_to, pad_tokens)

    def _sampling_batch(self, output: SchedulerOutput) -> SamplingBatch:
        if output.all_greedy:  # the common case, decided before building any per-row list
            return ALL_GREEDY
        rows = [s for s in output.scheduled if s.samples]
        # a token's output index (its seed's noise) is its position past the prompt, known ahead of time
        return make_sampling_batch([s.request.sampling for s in rows],
                                   [s.end - len(s.request.prompt_token_ids) for s in rows], self.device)


@dataclass(eq=False)
class HostTokens:
    """A host buffer for one step's sampled tokens (pinned on CUDA, with the event recorded after the copy)."""

    buffer: torch.Tensor  # int64 [capacity]
    array: np.ndarray  # the buffer as numpy: a slice of it costs less than a tensor's
    ready: torch.cuda.Event | None
    count: int = 0  # the tokens of the step that holds it


class TokenReadback:
    """Copies sampled tokens to the host behind their step, into buffers reused from step to step.

    ``start`` queues the copy and ``read`` waits for it, returns the tokens and takes the buffer back. A
    buffer belongs to one step from ``start`` to ``read``, so one is never reused while its step may still
    be read, however many steps are in flight (the engine has at most two); a step never read keeps its
    buffer. Waiting on the event, not on the stream, lets a step queued ahead keep the device busy meanwhile
    (``tensor.tolist()`` would synchronise the stream, the step queued after this one included).
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self._capacity = capacity
        self._cuda = device.type == "cuda"
        self._free: list[HostTokens] = []

    def start(self, sampled: torch.Tensor) -> HostTokens:
        count = sampled.numel()
        host = self._free.pop() if self._free else self._new(max(count, self._capacity))
        if host.buffer.numel() < count:  # more than max_num_seqs tokens: a step formed outside the scheduler
            host = self._new(count)
        host.count = count
        target = host.buffer if count == host.buffer.numel() else host.buffer[:count]
        target.copy_(sampled, non_blocking=True)
        if host.ready is not None:
            host.ready.record(torch.cuda.current_stream(sampled.device))  # the copy's stream: the tokens' device's
        return host

    def read(self, host: HostTokens) -> list[int]:
        if host.ready is not None:
            host.ready.synchronize()
        tokens = host.array[:host.count].tolist()
        self._free.append(host)
        return tokens

    def _new(self, capacity: int) -> HostTokens:
        buffer = torch.empty(capacity, dtype=torch.int64, pin_memory=self._cuda)
        return HostTokens(buffer, buffer.numpy(), torch.cuda.Event() if self._cuda else None)


class PendingStep:
    """A step queued on the device; ``wait()`` reads its tokens (the step's one host sync)."""

    def __init__(self, runner: ModelRunner, output: SchedulerOutput, sampled: torch.Tensor, logits: torch.Tensor,
                 cuda_graph: bool, host: HostTokens) -> None:
        self.runner = runner
        self.output = output
        self.sampled = sampled  # [number of sampling requests] int64, on the device: the next step's input ids
        self.logits = logits
        self.cuda_graph = cuda_graph
        self._host = host
        self._result: ModelOutput | None = None

    def wait(self) -> ModelOutput:
        """Blocks until this step's tokens are on the host; steps queued after it keep running. The tokens are
        read once (that gives their buffer back to be reused); a second call returns the same output."""
        if self._result is None:
            self._result = self._read()
        return self._result

    def _read(self) -> ModelOutput:
        start = time.perf_counter()
        tokens: list[int | None] = self.runner.token_readback.read(self._host)  # type: ignore[assignment]
        self.runner.last_device_wait_s = time.perf_counter() - start
        output = self.output
        if len(tokens) != output.num_seqs:  # a mixed step: None where a request did not sample
            it = iter(tokens)
            tokens = [next(it) if s.samples else None for s in output.scheduled]
        return ModelOutput(tokens, self.logits, self.cuda_graph)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
