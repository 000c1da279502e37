"""KVLayout: the shape and dtype of the KV that one TP rank sends or receives, and how two layouts must agree."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LayoutMismatch(ValueError):
    """Two layouts, or a tensor and a layout, disagree; the message names the field."""


@dataclass(frozen=True)
class KVLayout:
    """The KV of ``n`` tokens on one TP rank, as one contiguous tensor of ``shape(n)``::

        [num_layers, 2, n, num_kv_heads, head_dim]      dtype = DTYPES[dtype]
                     |
                     0 = K, 1 = V

    ``num_kv_heads`` counts the heads on this rank (the shard), not the model's total. The
    block size is not part of it: transfers are token-ranged, and each side scatters tokens
    into its own blocks.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def for_tensor(cls, kv: torch.Tensor, tp_rank: int = 0, tp_size: int = 1) -> KVLayout:
        """The layout that ``kv`` (shaped as ``shape(n)``) has."""
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise LayoutMismatch(
                f"kv must be [num_layers, 2, num_tokens, num_kv_heads, head_dim], got {list(kv.shape)}"
            )
        names = {v: k for k, v in DTYPES.items()}
        if kv.dtype not in names:
            raise LayoutMismatch(f"dtype {kv.dtype} is not one of {sorted(DTYPES)}")
        return cls(kv.shape[0], kv.shape[3], kv.shape[4], names[kv.dtype], tp_rank, tp_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers of this rank."""
        element_size = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element_size

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def check(self, kv: torch.Tensor) -> None:
        """Raise LayoutMismatch, naming the field, unless ``kv`` is ``shape(n)`` of ``dtype`` for some n."""
        if kv.dim() != 5:
            raise LayoutMismatch(f"kv must have 5 dims {list(self.shape(-1))}, got shape {list(kv.shape)}")
        dims = {"num_layers": 0, "num_kv_heads": 3, "head_dim": 4}
        for name, dim in dims.items():
            if kv.shape[dim] != getattr(self, name):
                raise LayoutMismatch(f"{name} differs: layout has {getattr(self, name)}, kv has {kv.shape[dim]}")
        if kv.shape[1] != 2:
            raise LayoutMismatch(f"dim 1 must be 2 (K, V), kv has {kv.shape[1]}")
        if kv.dtype != self.torch_dtype:
            raise LayoutMismatch(f"dtype differs: layout has {self.dtype}, kv has {kv.dtype}")

    def check_compatible(self, other: KVLayout) -> None:
        """Raise LayoutMismatch, naming the field, unless KV of ``other`` can be written as this layout.

        Only ``tp_rank`` may differ. Different ``tp_size`` would need resharding of heads, which
        is not implemented yet.
        """
        if self.tp_size != other.tp_size:
            raise LayoutMismatch(
                f"tp_size differs: {self.tp_size} here, {other.tp_size} on the other side "
                "(resharding KV heads between TP sizes is not supported yet)"
            )
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise LayoutMismatch(f"{name} differs: {mine!r} here, {theirs!r} on the other side")

    def compatible(self, other: KVLayout) -> bool:
        """Whether ``check_compatible(other)`` passes."""
        try:
            self.check_compatible(other)
        except LayoutMismatch:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        """The inverse of ``to_dict``; unknown or missing keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a KVLayout must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown KVLayout fields {unknown}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"bad KVLayout {data}: {e}") from e
