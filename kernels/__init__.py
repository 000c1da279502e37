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

from kernels import gemv, layer_norm, qkv_projection, rms_norm
from kernels.layer_norm import layer_norm_ref
from kernels.linear import linear_act_ref, linear_ref
from kernels.paged_attention import paged_attention_ref
from kernels.qkv_projection import qkv_kv_write_ref
from kernels.rms_norm import rms_norm_ref

Backend = Literal["torch", "triton"]


@dataclass(frozen=True)
class Ops:
    """One callable per op; see each op's module for shapes and semantics."""

    paged_attention: Callable
    qkv_kv_write: Callable  # qkv projection, rotary, KV-cache write
    rms_norm: Callable
    layer_norm: Callable
    linear: Callable
    linear_act: Callable  # linear, then the MLP's activation


TORCH_OPS = Ops(
    paged_attention=paged_attention_ref,
    qkv_kv_write=qkv_kv_write_ref,
    rms_norm=rms_norm_ref,
    layer_norm=layer_norm_ref,
    linear=linear_ref,
    linear_act=linear_act_ref,
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

# Norms, projections: the kernels sit next to their references; triton is imported and they are jitted at
# their first launch (kernels.rms_norm.jit_at_launch), not by ``import kernels``. The projections run a one-row
# x (batch-1 decode) as one GEMV launch with its epilogue (rotary + KV write, the activation); more rows by
# cuBLAS, then the rotary/KV-write or activation kernel (kernels.rotary, kv_write, activation).
if importlib.util.find_spec("triton") is not None:
    _TRITON_KERNELS.update(
        rms_norm=rms_norm.rms_norm,
        layer_norm=layer_norm.layer_norm,
        qkv_kv_write=qkv_projection.qkv_kv_write,
        linear=gemv.linear,
        linear_act=gemv.linear_act,
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
