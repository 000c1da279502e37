"""The L2 prefetch plan of a batch-1 decode step: which later weights each GEMV pulls in (kernels.l2_prefetch).

The projections' weights, in the order a step reads them (the modules' registration order: each layer's
qkv, o, up and down projections, then the lm_head, then around to the first layer for the next step), form
one stream of bytes. Projection i owns stream bytes [s_i, e_i). With a window of W bytes, it prefetches

    [max(s_i + W, e_i), e_i + W)      (modulo the stream's length)

the bytes up to W past its own end that the projection before it (which reached s_i + W) did not ask for:
together the projections ask for every byte once, each about W before it is read, and no projection
prefetches its own weights (W is at most the stream's length less the largest weight). W bounds what waits
in L2 (an H100 has 50 MB).
"""

from __future__ import annotations

from torch import nn

from engine.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear
from kernels.l2_prefetch import MAX_RANGES, L2Prefetch

Projection = ColumnParallelLinear | RowParallelLinear | ParallelLMHead


def projections(model: nn.Module) -> list[Projection]:
    """The modules whose weights a decode step streams, in the order it reads them."""
    return [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear | ParallelLMHead)]


def plan_weight_prefetch(model: nn.Module, window_bytes: int) -> int:
    """Sets ``prefetch`` (an ``L2Prefetch`` or None) on every projection of ``model``; 0 turns prefetching off.
    Returns how many projections got a range."""
    mods = projections(model)
    sizes = [m.weight.numel() * m.weight.element_size() for m in mods]
    total = sum(sizes)
    window = min(window_bytes, total - max(sizes, default=0))  # no projection wraps around onto its own weights
    planned, start = 0, 0
    for mod, size in zip(mods, sizes, strict=True):
        end = start + size
        lo, hi = max(start + window, end), end + window
        ranges = _stream_ranges(mods, sizes, lo, hi, total) if window > 0 and hi > lo else []
        mod.prefetch = L2Prefetch(tuple(ranges[:MAX_RANGES])) if ranges else None
        planned += bool(ranges)
        start = end
    return planned


def _stream_ranges(mods: list[Projection], sizes: list[int], lo: int, hi: int, total: int
                   ) -> list[tuple[int, int]]:
    """Stream bytes [lo, hi) (wrapping at ``total``) as (address, nbytes) pieces of the weights they fall in."""
    pieces, start = [], 0
    shift = lo // total * total
    lo, hi = lo - shift, hi - shift
    spans = [(lo, min(hi, total))] + ([(0, hi - total)] if hi > total else [])
    for mod, size in zip(mods, sizes, strict=True):
        for a, b in spans:
            a, b = max(a, start), min(b, start + size)
            if b > a:
                pieces.append(((a - lo) % total, L2Prefetch.of(mod.weight, a - start, b - a)))
        start += size
    return [piece for _, piece in sorted(pieces)]  # in the order the step reads them
