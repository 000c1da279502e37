"""Llama-style decoders (Llama 2/3, Mistral, Qwen2) over a flat varlen token batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.attention import Attention
from engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, rope_parameters
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


def head_dim_of(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, ops: Ops, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        tp = tp_group().size
        d = head_dim_of(cfg)
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.num_heads, self.num_kv_heads = divide(heads, tp, "attention heads"), divide(kv_heads, tp, "kv heads")
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, [heads * d, kv_heads * d, kv_heads * d], qkv_bias, ops)
        self.o_proj = RowParallelLinear(heads * d, cfg.hidden_size, o_bias, ops)
        rot_dim = int(d * getattr(cfg, "partial_rotary_factor", 1.0))
        self.rotary_emb = RotaryEmbedding(rot_dim, cfg.max_position_embeddings, rope_parameters(cfg))
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d**-0.5, ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(x, self.qkv_proj, positions, self.rotary_emb.cos_sin_cache))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, ops: Ops, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, ops, qkv_bias, o_bias)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "mlp_bias", False), ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, ops: Ops, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, ops, qkv_bias, o_bias) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, H]``; ``compute_logits(hidden) -> [N, V]``."""

    qkv_bias = False
    # HF sub-matrix name -> (our fused parameter, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: Any, ops: Ops) -> None:
        super().__init__()
        attention_bias = getattr(cfg, "attention_bias", False)
        self.model = LlamaModel(cfg, ops, self.qkv_bias or attention_bias, attention_bias)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ops)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> tuple[str, int]:
            for hf, (ours, shard) in self.packed_modules.items():
                if f".{hf}." in name:
                    return name.replace(f".{hf}.", f".{ours}."), shard
            return name, 0

        load_named_weights(self, ((*rename(n), t) for n, t in weights if "rotary_emb.inv_freq" not in n))


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on q, k and v (not on o)."""

    qkv_bias = True


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layout; the sliding window is handled by capping the context (see registry)."""
