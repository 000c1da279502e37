"""The ops layer: every op the models run, mapped to its torch reference or a fused kernel.

``get_ops("torch")`` returns the references (the test oracle, and the CPU path);
``get_ops("triton")`` returns the fused Triton kernel of each op that has one and the reference
for the rest, so kernels can land one at a time. ``replace_with_kernel_inject`` picks the backend.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    # one-row kernel of ``norm_linear`` (kernels.gemv.norm_gemv); None: norm_linear composes the ops above
    norm_linear_one_row: Callable | None = None
    # one-token kernel of ``norm_qkv_kv_write`` (kernels.gemv.norm_qkv_gemv); None: composed
    norm_qkv_one_row: Callable | None = None

    def norm_linear(
        self, x: Any, residual: Any, norm_weight: Any, norm_bias: Any, eps: float, weight: Any, bias: Any = None,
        activation: str | None = None,
    ) -> tuple[Any, Any]:
        """A pre-norm block's entry: h = x + residual (x alone when residual is None), then
        ``activation(linear(norm(h)))`` with RMSNorm (norm_bias None) or LayerNorm; returns (y, h).

        activation: None, "silu_and_mul" (weight = [gate; up]), "gelu_tanh" or "gelu". ``residual`` may be
        updated in place: use the returned h. A decode step of one row runs as one fused kernel where the
        backend has it; otherwise the ops run one after another.
        """
        if self.norm_linear_one_row is not None and x.dim() == 2 and x.shape[0] == 1:
            return self.norm_linear_one_row(x, residual, norm_weight, norm_bias, eps, weight, bias, activation)
        if norm_bias is None:
            normed = self.rms_norm(x, norm_weight, eps, residual)
        else:
            normed = self.layer_norm(x, norm_weight, norm_bias, eps, residual)
        y, h = normed if residual is not None else (normed, x)
        y = self.linear(y, weight, bias)
        if activation == "silu_and_mul":
            y = self.silu_and_mul(y)
        elif activation in ("gelu_tanh", "gelu"):
            y = self.gelu(y, "tanh" if activation == "gelu_tanh" else "none")
        elif activation is not None:
            raise ValueError(f"unknown activation {activation!r}; expected silu_and_mul, gelu_tanh or gelu")
        return y, h

    def norm_qkv_kv_write(
        self, x: Any, residual: Any, norm_weight: Any, norm_bias: Any, eps: float, weight: Any, bias: Any,
        heads: tuple[int, int, int], positions: Any, cos_sin_cache: Any, k_cache: Any, v_cache: Any,
        slot_mapping: Any,
    ) -> tuple[Any, Any]:
        """An attention block's entry: ``norm_linear`` to [q | k | v] of heads = (Hq, Hkv, D), rotary on q and
        k (none when cos_sin_cache is None), k and v written to the cache slots; returns (q [T, Hq, D], h).
        A decode step of one token runs as one fused kernel where the backend has it (whole-head rotary)."""
        num_heads, num_kv_heads, head_dim = heads
        one_token = self.norm_qkv_one_row is not None and x.dim() == 2 and x.shape[0] == 1
        if one_token and (cos_sin_cache is None or cos_sin_cache.shape[-1] == head_dim):
            return self.norm_qkv_one_row(x, residual, norm_weight, norm_bias, eps, weight, bias, heads, positions,
                                         cos_sin_cache, k_cache, v_cache, slot_mapping)
        qkv, h = self.norm_linear(x, residual, norm_weight, norm_bias, eps, weight, bias)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q = q.view(-1, num_heads, head_dim)
        k, v = k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
        if cos_sin_cache is None:
            self.kv_write(k, v, k_cache, v_cache, slot_mapping)
        else:
            q = self.rotary_kv_write(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
        return q, h


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
        norm_linear_one_row=gemv.norm_gemv,
        norm_qkv_one_row=gemv.norm_qkv_gemv,
    )


def get_ops(backend: Backend) -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return replace(TORCH_OPS, **_TRITON_KERNELS)
    raise ValueError(f"unknown ops backend {backend!r}; expected 'torch' or 'triton'")


def triton_ops_available() -> list[str]:
    """Names of the ops that run as Triton kernels under the "triton" backend."""
    return sorted(_TRITON_KERNELS)
