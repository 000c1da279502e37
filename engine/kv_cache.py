"""The KV tensor pool: one preallocated tensor per rank, cut into fixed-size blocks per layer.

    pool[layer, 0 = K | 1 = V, block_id, offset_in_block, kv_head, head_dim]

A block holds ``block_size`` consecutive tokens of one sequence for every layer; the block
manager hands out block ids, the model writes slot ``block_id * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import Attention


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout, self.num_blocks = layout, num_blocks
        self.pool = torch.zeros(
            layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim,
            dtype=layout.dtype, device=device,
        )

    def bind(self, model: torch.nn.Module) -> None:
        """Point every attention layer of ``model`` at its slice of the pool."""
        layers = attention_layers(model)
        if len(layers) != self.layout.num_layers:
            raise ValueError(f"model has {len(layers)} attention layers, KV layout has {self.layout.num_layers}")
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.pool[i, 0], self.pool[i, 1]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids of tokens [start, end) of a sequence stored in ``block_ids``."""
        bs = self.layout.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return (table[pos // bs] * bs + pos % bs).to(self.pool.device)

    def gather(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """A contiguous copy of tokens [start, end): [num_layers, 2, end - start, kv_heads, head_dim]."""
        flat = self.pool.flatten(2, 3)  # [layers, 2, num_blocks * block_size, kv_heads, head_dim]
        return flat.index_select(2, self.slots(block_ids, start, end))

    def scatter(self, block_ids: list[int], start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` (gather's layout) as tokens [start, start + n) of a sequence in ``block_ids``."""
        flat = self.pool.flatten(2, 3)
        flat.index_copy_(2, self.slots(block_ids, start, start + kv.shape[2]), kv.to(flat.device, flat.dtype))
