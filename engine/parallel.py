"""Tensor parallelism: the process's TP group and the column/row-parallel layers that use it.

Weights are sharded at load time by each parameter's ``weight_loader`` (the checkpoint holds the
full tensor; each rank keeps its slice), so one loader serves every TP size.

    column-parallel  y = x W^T   W: [out, in]  rank r keeps rows    r*out/tp : (r+1)*out/tp
    row-parallel     y = x W^T   W: [out, in]  rank r keeps columns r*in/tp  : (r+1)*in/tp,
                                               then the partial outputs are all-reduced
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kernels import Ops


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


_TP = TPGroup()


def tp_group() -> TPGroup:
    return _TP


def init_tensor_parallel(rank: int, size: int) -> None:
    """Set the process's TP group once at start-up (torch.distributed must be initialised if size > 1)."""
    global _TP
    if size > 1 and not dist.is_initialized():
        raise RuntimeError("tensor parallel size > 1 needs torch.distributed to be initialised first")
    _TP = TPGroup(rank, size)


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A weight_loader's guard: the checkpoint tensor must have the full (unsharded) shape we expect."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} != expected {tuple(expected)}")


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor parallel size ({d})")
    return n // d


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks; ``shard_sizes`` lists the full sizes of fused sub-matrices
    (q, k, v or gate, up): each one is split separately so every rank holds a slice of each."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, ops: Ops) -> None:
        super().__init__()
        tp = tp_group()
        self.ops = ops
        self.full_shard_sizes = shard_sizes
        self.shard_sizes = [divide(s, tp.size, "output features") for s in shard_sizes]
        out = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self._load  # type: ignore[attr-defined]
                p.num_shards = len(shard_sizes)  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        tp = tp_group()
        check_shape(loaded, (self.full_shard_sizes[shard], *param.shape[1:]))
        size = self.shard_sizes[shard]
        offset = sum(self.shard_sizes[:shard])
        param.data[offset : offset + size].copy_(loaded.narrow(0, tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over ranks; the partial products are summed by an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops) -> None:
        super().__init__()
        self.ops = ops
        self.in_features = in_features
        self.in_per_rank = divide(in_features, tp_group().size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        check_shape(loaded, (param.shape[0], self.in_features))
        start = tp_group().rank * self.in_per_rank
        param.data.copy_(loaded.narrow(1, start, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = tp_group()
        if tp.size == 1:  # the bias rides in the matmul's epilogue: no separate add kernel
            return self.ops.linear(x, self.weight, self.bias)
        y = tp.all_reduce(self.ops.linear(x, self.weight, None))  # the bias once, after the sum
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; a rank looks up its own rows and the sum is all-reduced."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        tp = tp_group()
        self.num_embeddings = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim), requires_grad=False)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        check_shape(loaded, (self.num_embeddings, param.shape[1]))
        rows = loaded[self.start : self.start + self.per_rank]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = tp_group()
        if tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        y = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection: each rank scores its vocab rows; logits are gathered on every rank."""

    def __init__(self, vocab_size: int, dim: int, ops: Ops) -> None:
        super().__init__(vocab_size, dim)
        self.vocab_size = vocab_size
        self.ops = ops

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = tp_group().all_gather_last_dim(self.ops.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
