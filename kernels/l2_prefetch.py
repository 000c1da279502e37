"""Weights prefetched into L2 ahead of the kernel that reads them (batch-1 decode on a GPU).

A batch-1 decode step is a chain of dependent kernels. HBM streams weights only while a GEMV runs: it idles
while a norm or attention runs and while a GEMV ramps up and drains, and on a small model (GPT-2 XL's layers
are 61 MB) those gaps are as long as the GEMVs. A kernel given an ``L2Prefetch`` has its programs, before
they wait for their producers, issue ``prefetch.global.L2`` for their share of up to ``MAX_RANGES`` byte
ranges: the weights of the GEMVs after it. HBM then keeps streaming across the gaps, and the GEMVs after it
read from L2. The hint changes no result; the torch references and the CPU interpreter ignore it.

    program p of P prefetches, of each range [address, address + nbytes):
        [p * share, min((p + 1) * share, nbytes)),   share = nbytes / P rounded up to a 128-byte line
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.rms_norm import jit_at_launch

tl: Any = None  # triton.language, bound at the first launch by jit_at_launch

MAX_RANGES = 3


@dataclass(frozen=True)
class L2Prefetch:
    """Byte ranges (address, nbytes) of device memory to pull into L2, at most MAX_RANGES. The memory must
    outlive every launch (and CUDA graph) given this hint: model weights."""

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.ranges) > MAX_RANGES or any(n < 0 for _, n in self.ranges):
            raise ValueError(f"an L2Prefetch holds at most {MAX_RANGES} ranges of >= 0 bytes, got {self.ranges}")

    @staticmethod
    def of(tensor: torch.Tensor, offset: int = 0, nbytes: int | None = None) -> tuple[int, int]:
        """The range of ``tensor``'s bytes [offset, offset + nbytes) (to its end by default)."""
        size = tensor.numel() * tensor.element_size()
        nbytes = size - offset if nbytes is None else nbytes
        if not tensor.is_contiguous() or offset < 0 or offset + nbytes > size:
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) of a {size}-byte contiguous tensor")
        return tensor.data_ptr() + offset, nbytes


def prefetch_meta(prefetch: L2Prefetch | None, device: torch.device) -> dict[str, Any]:
    """A launch's prefetch arguments: PF0..PF2 / PF0_BYTES.. (address, bytes; unused ones 0) and the PREFETCH
    constexpr, on only on CUDA (the interpreter runs no PTX)."""
    ranges = list(prefetch.ranges) if prefetch is not None and device.type == "cuda" else []
    ranges = [r for r in ranges if r[1] > 0]
    padded = ranges + [(0, 0)] * (MAX_RANGES - len(ranges))
    meta: dict[str, Any] = {"PREFETCH": bool(ranges)}
    for i, (address, nbytes) in enumerate(padded):
        meta[f"pf{i}"], meta[f"pf{i}_bytes"] = address, nbytes
    return meta


@jit_at_launch
def _prefetch_range(address, nbytes, part, parts):
    share = tl.cdiv(tl.cdiv(nbytes, parts), 128) * 128
    lo = part.to(tl.int64) * share
    hi = tl.minimum(lo + share, nbytes)
    for start in range(lo, hi, 256 * 128):  # 256 lines of 128 bytes a step, one prefetch each (2 a thread)
        offs = tl.minimum(start + tl.arange(0, 256).to(tl.int64) * 128, hi - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [address + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@jit_at_launch
def prefetch_l2(pf0, pf0_bytes, pf1, pf1_bytes, pf2, pf2_bytes, PREFETCH: tl.constexpr):
    """This program's share of each range (see the module docstring); nothing unless PREFETCH. Only issues
    the prefetches: it waits for nothing and writes nothing, so it may run before ``wait_for_producers``."""
    if PREFETCH:
        part, parts = tl.program_id(0), tl.num_programs(0)
        _prefetch_range(pf0, pf0_bytes, part, parts)
        _prefetch_range(pf1, pf1_bytes, part, parts)
        _prefetch_range(pf2, pf2_bytes, part, parts)
