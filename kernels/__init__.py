"""The ops layer: every op the models run, mapped to its torch reference or a fused kernel.

``get_ops("torch")`` returns the references (the test oracle, and the CPU path);
``get_ops("triton")`` returns the fused Triton kernel of each op that has one and the reference
for the rest, so kernels can land one at a time. ``replace_with_kernel_inject`` picks the backend.
``get_ops("triton", pdl=True)`` launches every Triton kernel with programmatic dependent launch (Hopper+:
each kernel starts while the one before it finishes; see ``kernels.rms_norm.wait_for_producers``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from kernels import activation, gemv, kv_write, layer_norm, rms_norm, rotary
from kernels.activation import gelu_ref, silu_and_mul_ref
from kernels.kv_write import kv_write_ref
from kernels.layer_norm import layer_norm_ref
from kernels.linear import linear_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import rms_norm_ref
from kernels.rotary import rotary_kv_write_ref, rotary_ref

Backend = Literal["torch", "triton"]


@dataclass(frozen=True)
class Ops:
    """One callable per op; see each op's module for shapes and semantics."""

    paged_attention: Callable
    kv_write: Callable
    rotary: Callable
    rotary_kv_write: Callable
    rms_norm: Callable
    layer_norm: Callable
    silu_and_mul: Callable
    gelu: Callable
    linear: Callable


TORCH_OPS = Ops(
    paged_attention=paged_attention_ref,
    kv_write=kv_write_ref,
    rotary=rotary_ref,
    rotary_kv_write=rotary_kv_write_ref,
    rms_norm=rms_norm_ref,
    layer_norm=layer_norm_ref,
    silu_and_mul=silu_and_mul_ref,
    gelu=gelu_ref,
    linear=linear_ref,
)

# Ops that have a fused Triton kernel; the rest fall back to the reference.
_TRITON_KERNELS: dict[str, Callable] = {}


def _paged_attention_triton(*args: Any, **kwargs: Any) -> Any:
    """kernels.paged_attention_triton.paged_attention, imported on first call, not with ``kernels``:
    @triton.jit picks GPU or interpreter (TRITON_INTERPRET) once, when the module is imported."""
    from kernels.paged_attention_triton import paged_attention

    return paged_attention(*args, **kwargs)


if importlib.util.find_spec("triton") is not None:
    _TRITON_KERNELS["paged_attention"] = _paged_attention_triton

# Norms, rotary, KV write, activations: the kernels sit next to their references; triton is imported
# and they are jitted at their first launch (kernels.rms_norm.jit_at_launch), not by ``import kernels``.
if importlib.util.find_spec("triton") is not None:
    _TRITON_KERNELS.update(
        rms_norm=rms_norm.rms_norm,
        layer_norm=layer_norm.layer_norm,
        rotary=rotary.rotary,
        kv_write=kv_write.kv_write,
        rotary_kv_write=rotary.rotary_kv_write,
        silu_and_mul=activation.silu_and_mul,
        gelu=activation.gelu,
        linear=gemv.linear,  # one-row products by the GEMV kernel, the rest by cuBLAS
    )


def get_ops(backend: Backend, *, pdl: bool = False) -> Ops:
    """The ops of ``backend``; ``pdl`` (triton only) passes ``pdl=True`` to every Triton kernel's launcher."""
    if backend == "torch":
        if pdl:
            raise ValueError("pdl applies to the 'triton' backend's kernels, not to the torch references")
        return TORCH_OPS
    if backend == "triton":
        kernels = {name: partial(fn, pdl=True) for name, fn in _TRITON_KERNELS.items()} if pdl else _TRITON_KERNELS
        return replace(TORCH_OPS, **kernels)
    raise ValueError(f"unknown ops backend {backend!r}; expected 'torch' or 'triton'")


def triton_ops_available() -> list[str]:
    """Names of the ops that run as Triton kernels under the "triton" backend."""
    return sorted(_TRITON_KERNELS)
