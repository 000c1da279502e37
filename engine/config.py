"""Engine configuration: pydantic models with DeepSpeed-Inference-compatible aliases.

dtype stays a name here ("auto", "float32", "float16", "bfloat16"); the engine resolves "auto"
with `EngineConfig.resolve_dtype` and maps the name to torch with `torch_dtype`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import torch

DtypeName = Literal["auto", "float32", "float16", "bfloat16"]
_CONCRETE_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    **dict.fromkeys(("fp32", "float", "torch.float32", "torch.float"), "float32"),
    **dict.fromkeys(("fp16", "half", "torch.float16", "torch.half"), "float16"),
    **dict.fromkeys(("bf16", "bfloat", "torch.bfloat16"), "bfloat16"),
}


def normalize_dtype(value: Any) -> Any:
    """Map a dtype alias (a string or a torch.dtype) to its name; other values pass through."""
    if type(value).__name__ == "dtype":
        value = str(value)
    if not isinstance(value, str):
        return value
    key = value.strip().lower()
    if key in ("int8", "torch.int8"):
        raise ValueError("dtype int8 is not an activation dtype; quantize with quant=True")
    return _DTYPE_ALIASES.get(key, key)


def torch_dtype(name: str) -> torch.dtype:
    """The torch.dtype for a dtype name or alias; "auto" must be resolved first."""
    import torch

    canonical = normalize_dtype(name)
    if canonical not in _CONCRETE_DTYPES:
        raise ValueError(f"no torch dtype for {name!r}; resolve 'auto' first")
    return getattr(torch, canonical)


def _power_of_two(lo: int, hi: int) -> AfterValidator:
    def check(v: int) -> int:
        if not lo <= v <= hi or v & (v - 1):
            raise ValueError(f"must be a power of two in {lo}..{hi}, got {v}")
        return v

    return AfterValidator(check)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_name_and_alias(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                alias = field.validation_alias
                if isinstance(alias, str) and alias in data and name in data:
                    raise ValueError(f"give {name!r} or its alias {alias!r}, not both")
        return data


class QuantConfig(_Frozen):
    """Weight-only int8 quantization; also reads DeepSpeed's nested `{"weight": {...}}` form.

    DeepSpeed's `q_groups` counts groups per matrix, not their size, so it only picks the
    granularity: 1 -> per_channel (never coarser than asked), more -> per_group of `group_size`.
    """

    enabled: bool = False
    bits: int = Field(default=8, validation_alias="num_bits")
    granularity: Literal["per_channel", "per_group"] = "per_channel"
    group_size: Annotated[int, _power_of_two(16, 1 << 16)] = 128
    symmetric: bool = True

    @model_validator(mode="before")
    @classmethod
    def _flatten_deepspeed_form(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "weight" not in data:
            return data
        data = dict(data)
        weight = dict(data.pop("weight") or {})
        flat: dict[str, Any] = {}
        if "num_bits" in weight:
            flat["bits"] = weight.pop("num_bits")
        if "q_type" in weight:
            q_type = weight.pop("q_type")
            if q_type not in ("symmetric", "asymmetric"):
                raise ValueError(f"q_type must be 'symmetric' or 'asymmetric', got {q_type!r}")
            flat["symmetric"] = q_type == "symmetric"
        if "q_groups" in weight:
            q_groups = weight.pop("q_groups")
            if not isinstance(q_groups, int) or isinstance(q_groups, bool) or q_groups < 1:
                raise ValueError(f"q_groups must be a positive int, got {q_groups!r}")
            flat["granularity"] = "per_channel" if q_groups == 1 else "per_group"
        if weight:
            raise ValueError(f"unknown keys in quant.weight: {sorted(weight)}")
        for key in flat:
            if key in data or (key == "bits" and "num_bits" in data):
                raise ValueError(f"quant.{key} is given both flat and in quant.weight")
        return {**data, **flat}

    @field_validator("bits")
    @classmethod
    def _only_8_bits(cls, v: int) -> int:
        if v != 8:
            raise ValueError(f"only 8-bit weight quantization is supported, got {v}")
        return v


class TensorParallelConfig(_Frozen):
    """Tensor parallelism: the model is split over `tp_size` ranks."""

    tp_size: int = Field(default=1, ge=1)
    enabled: bool = True


def _tp_as_dict(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"tp_size": value}
    return value.model_dump() if isinstance(value, TensorParallelConfig) else value


class EngineConfig(_Frozen):
    """Everything one engine process needs, validated once at construction.

    Lengths and budgets count tokens. `tensor_parallel.tp_size` is the one truth for TP:
    DeepSpeed's deprecated `mp_size` is folded into it and not kept.
    """

    model: str | None = None
    dtype: DtypeName = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensor_parallel: TensorParallelConfig = Field(
        default_factory=TensorParallelConfig, validation_alias="tp"
    )
    replace_with_kernel_inject: bool | None = Field(
        default=None, validation_alias="kernel_inject"
    )
    enable_cuda_graph: bool = False
    # with enable_cuda_graph, the steps that replay graphs: "all" (decode batches, and one sequence's prompt
    # chunks), "decode", or "prefill" (prompt chunks only: a prefill worker never runs a decode step)
    cuda_graph_steps: Literal["all", "decode", "prefill"] = "all"
    # programmatic dependent launch of the injected Triton kernels (each starts while the one before it
    # finishes); None: on where they run on a GPU that has it (compute capability 9.0+, Hopper)
    enable_pdl: bool | None = None
    # queue the next decode step before reading this one's tokens (the CPU's step work hides behind the
    # GPU's); None: on where the engine runs on CUDA
    async_scheduling: bool | None = None
    quant: QuantConfig = Field(default_factory=QuantConfig)
    max_out_tokens: int | None = Field(default=None, ge=1, validation_alias="max_tokens")
    block_size: Annotated[int, _power_of_two(1, 256)] = 16
    num_kv_blocks: int | None = Field(default=None, ge=1)
    kv_cache_memory_fraction: float = Field(
        default=0.9, gt=0, le=1, validation_alias="gpu_memory_utilization"
    )
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    max_num_batched_tokens: int = Field(default=2048, ge=1, validation_alias="token_budget")
    max_num_seqs: int = Field(default=256, ge=1, validation_alias="max_batch_size")
    prefill_chunk_size: int = Field(default=512, ge=1, validation_alias="chunk_size")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _fold_tp_and_mp_size(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        key = "tp" if "tp" in data else "tensor_parallel"
        tp = _tp_as_dict(data.get(key, {}))
        if "mp_size" in data and isinstance(tp, dict):
            mp_size = data.pop("mp_size")
            if tp.get("tp_size", mp_size) != mp_size:
                raise ValueError(f"mp_size={mp_size} disagrees with tp_size={tp['tp_size']}")
            tp = {**tp, "tp_size": mp_size}
        if key in data or tp:
            data[key] = tp
        return data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        return normalize_dtype(v)

    @field_validator("quant", mode="before")
    @classmethod
    def _quant_from_bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check_budgets(self) -> EngineConfig:
        budget = f"max_num_batched_tokens ({self.max_num_batched_tokens})"
        if self.prefill_chunk_size > self.max_num_batched_tokens:
            raise ValueError(f"prefill_chunk_size ({self.prefill_chunk_size}) exceeds {budget}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) exceeds {budget}: "
                "every running request needs one token a step"
            )
        return self

    @property
    def captures_decode_graphs(self) -> bool:
        return self.enable_cuda_graph and self.cuda_graph_steps != "prefill"

    @property
    def captures_prefill_graphs(self) -> bool:
        """Graphs of one sequence's prompt chunk (``engine.cuda_graphs.PrefillGraphs``)."""
        return self.enable_cuda_graph and self.cuda_graph_steps != "decode"

    @property
    def tp_size(self) -> int:
        return self.tensor_parallel.tp_size

    def resolve_dtype(self, device_type: str, checkpoint_dtype: str | None) -> str:
        """The dtype name to run in: "auto" is the checkpoint's on CUDA, float32 on CPU.

        A checkpoint that names no dtype is float32, as transformers assumes.
        """
        _check_device_type(device_type)
        if self.dtype != "auto":
            return self.dtype
        if device_type == "cpu" or checkpoint_dtype is None:
            return "float32"
        resolved = normalize_dtype(checkpoint_dtype)
        if resolved not in _CONCRETE_DTYPES:
            raise ValueError(f"checkpoint dtype {checkpoint_dtype!r} unsupported; set dtype")
        return str(resolved)

    def use_kernels(self, device_type: str) -> bool:
        """`replace_with_kernel_inject` if set, else True on CUDA and False on CPU."""
        _check_device_type(device_type)
        if self.replace_with_kernel_inject is None:
            return device_type == "cuda"
        return self.replace_with_kernel_inject

    def use_pdl(self, device_type: str, compute_capability: tuple[int, int] | None) -> bool:
        """`enable_pdl` if set (an error where it cannot run), else on with the kernels on a 9.0+ GPU."""
        can = self.use_kernels(device_type) and compute_capability is not None and compute_capability >= (9, 0)
        if self.enable_pdl and not can:
            raise ValueError("enable_pdl needs the injected kernels on a CUDA GPU of compute capability 9.0+ "
                             f"(device {device_type}, capability {compute_capability}, "
                             f"kernels {'on' if self.use_kernels(device_type) else 'off'})")
        return can if self.enable_pdl is None else self.enable_pdl

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EngineConfig:
        """Read a .json, .yaml or .yml file that holds one mapping of config keys."""
        return cls.model_validate(_read_mapping(Path(path)))

    @classmethod
    def from_any(cls, obj: Any = None, **overrides: Any) -> EngineConfig:
        """Build from None, a dict, an EngineConfig or a file path; `overrides` win."""
        if isinstance(obj, EngineConfig) and not overrides:
            return obj
        if isinstance(obj, (str, os.PathLike)):
            base = cls.from_file(obj)
        elif obj is None or isinstance(obj, (dict, EngineConfig)):
            base = cls.model_validate(obj or {})
        else:
            raise TypeError(f"config must be None, dict, EngineConfig or path, got {obj!r}")
        return cls.model_validate({**base.model_dump(), **_canonical_keys(overrides)})


def _check_device_type(device_type: str) -> None:
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")


def _canonical_keys(overrides: dict[str, Any]) -> dict[str, Any]:
    fields = EngineConfig.model_fields.items()
    names = {f.validation_alias: n for n, f in fields if isinstance(f.validation_alias, str)}
    names["mp_size"] = "tensor_parallel"
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        name = names.get(key, key)
        if name in out:
            raise ValueError(f"override {key!r} repeats {name!r}")
        out[name] = value
    return out


def _read_mapping(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    text = path.read_text()
    if suffix == ".json":
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml)") from e
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise TypeError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data
