"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, Conv1D weights stored [in, out]."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from engine.attention import Attention
from engine.models.layers import LayerNorm
from engine.models.loader import load_named_weights
from engine.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    tp_group,
)
from kernels import Ops

_GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu_erf"}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = divide(cfg.num_attention_heads, tp_group().size, "attention heads")
        self.head_dim = h // cfg.num_attention_heads
        self.c_attn = ColumnParallelLinear(h, [h, h, h], True, ops)
        self.c_proj = RowParallelLinear(h, h, True, ops)
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.attn(x, self.c_attn))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.hidden_size
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, [inner], True, ops)
        self.c_proj = RowParallelLinear(inner, cfg.hidden_size, True, ops)
        self.activation = _GELU[cfg.activation_function]
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.ops.linear_act(x, self.c_fc.weight, self.c_fc.bias, self.activation))


class GPT2Block(nn.Module):
    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, ops)
        self.attn = GPT2Attention(cfg, ops)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, ops)
        self.mlp = GPT2MLP(cfg, ops)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.ln_1(h), h
        else:
            h, residual = self.ln_1(h, residual)
        h, residual = self.ln_2(self.attn(h), residual)
        return self.mlp(h), residual


class GPT2Model(nn.Module):
    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = VocabParallelEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.wte(input_ids) + self.wpe(positions), None
        for block in self.h:
            h, residual = block(h, residual)
        h, _ = self.ln_f(h, residual)
        return h


class GPT2LMHeadModel(nn.Module):
    """Same interface as LlamaForCausalLM; the head is always tied to ``wte`` as in GPT-2."""

    _conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        options = ("scale_attn_by_inverse_layer_idx", "add_cross_attention")
        unsupported = [k for k in options if getattr(cfg, k, False)]
        if unsupported:
            raise ValueError(f"GPT-2 option(s) not supported: {', '.join(unsupported)}")
        if cfg.activation_function not in _GELU:
            supported = ", ".join(_GELU)
            raise ValueError(f"GPT-2 activation {cfg.activation_function!r} not supported; supported: {supported}")
        self.transformer = GPT2Model(cfg, ops)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ops)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_weights(self, self._rename(weights))

    def _rename(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name, tensor in weights:
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # checkpoints saved from GPT2Model lack the prefix
            if name.endswith(self._conv1d):
                tensor = tensor.t()
            if ".c_attn." in name:  # fused q|k|v: load as three shards so TP slices each
                for shard, part in enumerate(tensor.chunk(3, dim=0)):
                    yield name, shard, part
            else:
                yield name, 0, tensor
