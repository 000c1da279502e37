"""Turns a SchedulerOutput into tensors, runs the model over the flat batch, and samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import torch

from engine.attention import AttentionMetadata, forward_context
from engine.config import EngineConfig, torch_dtype
from engine.kv_cache import KVCache, KVLayout, attention_layers
from engine.models.loader import iter_weights
from engine.models.registry import build_model
from engine.sampler import Sampler, make_sampling_batch
from engine.scheduler import SchedulerOutput
from kernels import get_ops

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled


@dataclass(frozen=True)
class ModelOutput:
    sampled_token_ids: list[int | None]  # one per scheduled request, None where it did not sample
    logits: torch.Tensor  # [number of sampling requests, vocab] float32, in scheduled order


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(name)


class ModelRunner:
    """Owns the model, the KV pool and the sampler of one rank."""

    def __init__(self, config: EngineConfig, hf_config: Any, weights: Any = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        ckpt_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        self.dtype = torch_dtype(config.resolve_dtype(self.device.type, _dtype_name(ckpt_dtype)))
        backend = "triton" if config.use_kernels(self.device.type) else "torch"
        self.model = self._build(hf_config, backend, weights)
        self.vocab_size = hf_config.vocab_size
        self.kv_cache = self._allocate_kv_cache()
        self.sampler = Sampler(config.seed)

    def _build(self, hf_config: Any, backend: str, weights: Any) -> torch.nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = build_model(hf_config, get_ops(backend))  # type: ignore[arg-type]
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(weights if weights is not None else iter_weights(self.config.model))
        return model.eval()

    def _allocate_kv_cache(self) -> KVCache:
        attn = attention_layers(self.model)
        layout = KVLayout(len(attn), self.config.block_size, attn[0].num_kv_heads, attn[0].head_dim, self.dtype)
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit(layout)
        cache = KVCache(layout, num_blocks, self.device)
        cache.bind(self.model)
        log.info("kv_cache_allocated", blocks=num_blocks, tokens=num_blocks * layout.block_size,
                 gib=round(cache.nbytes / 2**30, 3), device=str(self.device))
        return cache

    def _blocks_that_fit(self, layout: KVLayout) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_memory_fraction
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        blocks = int(budget // layout.bytes_per_block())
        if blocks < 1:
            raise RuntimeError("no memory left for one KV-cache block; use a smaller model or a larger KV budget")
        return blocks

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ModelOutput:
        inputs = self.prepare_inputs(output)
        with forward_context(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        rows = [s for s in output.scheduled if s.samples]
        batch = make_sampling_batch(
            [s.request.sampling for s in rows], [s.request.num_output_tokens for s in rows], self.device
        )
        tokens = iter(self.sampler(logits, batch).tolist())  # the step's one host sync
        return ModelOutput([next(tokens) if s.samples else None for s in output.scheduled], logits)

    def prepare_inputs(self, output: SchedulerOutput) -> StepInputs:
        sched = output.scheduled
        bs = self.config.block_size
        input_ids: list[int] = []
        starts, ends, lens = [0], [], []
        for s in sched:
            input_ids.extend(s.request.token_slice(s.start, s.end))
            starts.append(starts[-1] + s.num_new_tokens)
            ends.append(s.end)
            lens.append(s.num_new_tokens)
        width = max(len(s.request.block_ids) for s in sched)
        tables = torch.tensor([s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in sched],
                              dtype=torch.int32)
        seq_idx = torch.repeat_interleave(torch.arange(len(sched)), torch.tensor(lens))
        start_of = torch.tensor([s.start for s in sched])
        positions = torch.arange(len(input_ids)) - torch.tensor(starts[:-1]).repeat_interleave(torch.tensor(lens))
        positions += start_of[seq_idx]
        slots = tables[seq_idx, positions // bs].long() * bs + positions % bs
        logits_indices = torch.tensor([starts[i + 1] - 1 for i, s in enumerate(sched) if s.samples], dtype=torch.long)
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=slots.to(dev, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(ends, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            max_query_len=max(lens),
            max_seq_len=max(ends),
        )
        return StepInputs(
            torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions.to(dev, non_blocking=True),
            metadata,
            logits_indices.to(dev, non_blocking=True),
        )


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
