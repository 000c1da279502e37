"""The ops layer: every op the models run, mapped to its torch reference or a fused kernel.

``get_ops("torch")`` returns the references (the test oracle, and the CPU path);
``get_ops("triton")`` returns the fused Triton kernel of each op that has one and the reference
for the rest, so kernels can land one at a time. ``replace_with_kernel_inject`` picks the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from kernels.activation import gelu_ref, silu_and_mul_ref
from kernels.kv_write import kv_write_ref
from kernels.layer_norm import layer_norm_ref
from kernels.linear import linear_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_ref

Backend = Literal["torch", "triton"]


@dataclass(frozen=True)
class Ops:
    """One callable per op; see each op's module for shapes and semantics."""

    paged_attention: Callable
    kv_write: Callable
    rotary: Callable
    rms_norm: Callable
    layer_norm: Callable
    silu_and_mul: Callable
    gelu: Callable
    linear: Callable


TORCH_OPS = Ops(
    paged_attention=paged_attention_ref,
    kv_write=kv_write_ref,
    rotary=rotary_ref,
    rms_norm=rms_norm_ref,
    layer_norm=layer_norm_ref,
    silu_and_mul=silu_and_mul_ref,
    gelu=gelu_ref,
    linear=linear_ref,
)

# Ops that have a fused Triton kernel; the rest fall back to the reference.
_TRITON_KERNELS: dict[str, Callable] = {}


def get_ops(backend: Backend) -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return replace(TORCH_OPS, **_TRITON_KERNELS)
    raise ValueError(f"unknown ops backend {backend!r}; expected 'torch' or 'triton'")


def triton_ops_available() -> list[str]:
    """Names of the ops that run as Triton kernels under the "triton" backend."""
    return sorted(_TRITON_KERNELS)
