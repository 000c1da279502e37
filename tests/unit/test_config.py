"""Unit tests for engine.config: defaults, DeepSpeed aliases, refusals, files and overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from engine.config import EngineConfig, QuantConfig, TensorParallelConfig, torch_dtype


def _cfg(**raw: Any) -> EngineConfig:
    """Validate raw input the way a dict or file would arrive (aliases, lax values)."""
    return EngineConfig.model_validate(raw)


def test_constructor_accepts_aliases_too() -> None:
    cfg = EngineConfig(tp=2, max_tokens=64)  # type: ignore[call-arg]
    assert (cfg.tp_size, cfg.max_out_tokens) == (2, 64)


def test_defaults() -> None:
    cfg = EngineConfig()
    assert cfg.model is None
    assert cfg.dtype == "auto"
    assert cfg.device == "auto"
    assert cfg.tp_size == 1 and cfg.tensor_parallel.enabled
    assert cfg.replace_with_kernel_inject is None
    assert cfg.enable_cuda_graph is False
    assert cfg.enable_pdl is None
    assert cfg.quant == QuantConfig()
    assert not cfg.quant.enabled and cfg.quant.bits == 8 and cfg.quant.symmetric
    assert cfg.quant.granularity == "per_channel" and cfg.quant.group_size == 128
    assert cfg.max_out_tokens is None
    assert cfg.block_size == 16
    assert cfg.num_kv_blocks is None
    assert cfg.kv_cache_memory_fraction == 0.9
    assert cfg.cpu_kv_cache_gib == 1.0
    assert cfg.max_num_batched_tokens == 2048
    assert cfg.max_num_seqs == 256
    assert cfg.prefill_chunk_size == 512
    assert cfg.seed == 0


def test_no_mp_size_or_offload_field() -> None:
    assert "mp_size" not in EngineConfig.model_fields
    assert "offload_weights" not in EngineConfig.model_fields
    assert "mp_size" not in _cfg(mp_size=2).model_dump()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tp": 2},
        {"tp": {"tp_size": 2}},
        {"tensor_parallel": 2},
        {"tensor_parallel": {"tp_size": 2}},
        {"tensor_parallel": TensorParallelConfig(tp_size=2)},
        {"mp_size": 2},
        {"mp_size": 2, "tp": 2},
        {"mp_size": 2, "tensor_parallel": {"enabled": True}},
    ],
)
def test_tp_aliases(kwargs: dict) -> None:
    cfg = _cfg(**kwargs)
    assert cfg.tp_size == 2
    assert cfg.tensor_parallel.tp_size == 2


def test_tp_dict_keeps_enabled() -> None:
    cfg = _cfg(tp={"tp_size": 4, "enabled": False}, mp_size=4)
    assert cfg.tensor_parallel == TensorParallelConfig(tp_size=4, enabled=False)


def test_caller_dict_not_mutated() -> None:
    data = {"mp_size": 2, "tp": {"tp_size": 2}}
    EngineConfig.model_validate(data)
    assert data == {"mp_size": 2, "tp": {"tp_size": 2}}


@pytest.mark.parametrize(
    ("alias", "name", "value"),
    [
        ("kernel_inject", "replace_with_kernel_inject", True),
        ("max_tokens", "max_out_tokens", 4096),
        ("token_budget", "max_num_batched_tokens", 1024),
        ("max_batch_size", "max_num_seqs", 64),
        ("chunk_size", "prefill_chunk_size", 128),
        ("gpu_memory_utilization", "kv_cache_memory_fraction", 0.5),
    ],
)
def test_scalar_aliases(alias: str, name: str, value: object) -> None:
    assert getattr(_cfg(**{alias: value}), name) == value
    assert getattr(_cfg(**{name: value}), name) == value


def test_name_and_alias_together_refused() -> None:
    with pytest.raises(ValidationError, match="max_tokens"):
        _cfg(max_tokens=10, max_out_tokens=20)
    with pytest.raises(ValidationError, match="not both"):
        _cfg(tp=2, tensor_parallel=2)


def test_quant_true_means_enabled() -> None:
    assert _cfg(quant=True).quant.enabled
    assert not _cfg(quant=False).quant.enabled
    assert _cfg(quant=True).quant.bits == 8


def test_quant_flat_and_num_bits_alias() -> None:
    q = _cfg(quant={"enabled": True, "num_bits": 8, "granularity": "per_group",
                            "group_size": 64, "symmetric": False}).quant
    assert (q.enabled, q.bits, q.granularity, q.group_size, q.symmetric) == (
        True, 8, "per_group", 64, False)


def test_quant_deepspeed_nested_form() -> None:
    raw = {"enabled": True, "weight": {"num_bits": 8, "q_type": "asymmetric", "q_groups": 4}}
    q = _cfg(quant=raw).quant
    assert q.enabled and q.bits == 8 and not q.symmetric
    assert q.granularity == "per_group"
    q1 = QuantConfig.model_validate({"enabled": True, "weight": {"q_type": "symmetric",
                                                                 "q_groups": 1}})
    assert q1.symmetric and q1.granularity == "per_channel"


@pytest.mark.parametrize(
    ("weight", "needle"),
    [
        ({"num_bits": 4}, "only 8-bit"),
        ({"q_type": "weird"}, "q_type"),
        ({"q_groups": 0}, "q_groups"),
        ({"q_bits": 8}, "q_bits"),
    ],
)
def test_quant_nested_form_refusals(weight: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        QuantConfig.model_validate({"enabled": True, "weight": weight})


def test_quant_nested_and_flat_conflict_refused() -> None:
    with pytest.raises(ValidationError, match="both flat and in quant.weight"):
        QuantConfig.model_validate({"symmetric": True, "weight": {"q_type": "asymmetric"}})


@pytest.mark.parametrize("bits", [4, 16])
def test_quant_bits_other_than_8_refused(bits: int) -> None:
    with pytest.raises(ValidationError, match=f"only 8-bit weight quantization.*got {bits}"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, 8, 24, 100, -16])
def test_quant_group_size_power_of_two(group_size: int) -> None:
    with pytest.raises(ValidationError, match="power of two"):
        QuantConfig(group_size=group_size)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("fp32", "float32"), ("float", "float32"), ("torch.float32", "float32"),
        ("float32", "float32"),
        ("fp16", "float16"), ("half", "float16"), ("torch.float16", "float16"),
        ("FP16", "float16"),
        ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"), ("bfloat16", "bfloat16"),
        ("auto", "auto"),
        (torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
    ],
)
def test_dtype_aliases(given: object, expected: str) -> None:
    assert _cfg(dtype=given).dtype == expected


@pytest.mark.parametrize("bad", ["float64", "int8", torch.int8, "fp8"])
def test_dtype_unknown_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="dtype"):
        _cfg(dtype=bad)


def test_unknown_key_refused_with_its_name() -> None:
    with pytest.raises(ValidationError) as info:
        EngineConfig.model_validate({"tp_sise": 2})
    assert "tp_sise" in str(info.value)
    assert "Extra inputs are not permitted" in str(info.value)


def test_unknown_nested_key_refused_with_its_name() -> None:
    with pytest.raises(ValidationError, match="tp_sise"):
        _cfg(tp={"tp_sise": 2})
    with pytest.raises(ValidationError, match="activation"):
        _cfg(quant={"enabled": True, "activation": {"num_bits": 8}})


@pytest.mark.parametrize("block_size", [0, 3, 24, 512, -16])
def test_block_size_must_be_power_of_two(block_size: int) -> None:
    with pytest.raises(ValidationError) as info:
        _cfg(block_size=block_size)
    assert "block_size" in str(info.value) and "power of two" in str(info.value)


@pytest.mark.parametrize("block_size", [1, 2, 16, 256])
def test_block_size_powers_of_two_accepted(block_size: int) -> None:
    assert _cfg(block_size=block_size).block_size == block_size


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tp": 0},
        {"tp": {"tp_size": -1}},
        {"mp_size": 0},
        {"tp": True},
        {"max_num_batched_tokens": -1},
        {"max_num_batched_tokens": 0},
        {"max_num_seqs": 0},
        {"prefill_chunk_size": 0},
        {"max_out_tokens": 0},
        {"num_kv_blocks": 0},
        {"kv_cache_memory_fraction": 0},
        {"kv_cache_memory_fraction": 1.5},
        {"gpu_memory_utilization": -0.1},
        {"cpu_kv_cache_gib": 0},
        {"device": "tpu"},
        {"quant": {"granularity": "per_tensor"}},
    ],
)
def test_impossible_values_refused(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        _cfg(**kwargs)


def test_fraction_one_accepted() -> None:
    assert _cfg(kv_cache_memory_fraction=1.0).kv_cache_memory_fraction == 1.0


def test_chunk_above_budget_refused_naming_both() -> None:
    with pytest.raises(ValidationError) as info:
        _cfg(max_num_batched_tokens=256, prefill_chunk_size=512, max_num_seqs=8)
    assert "prefill_chunk_size" in str(info.value)
    assert "max_num_batched_tokens" in str(info.value)


def test_max_num_seqs_above_budget_refused() -> None:
    with pytest.raises(ValidationError, match="max_num_seqs"):
        _cfg(max_num_batched_tokens=64, prefill_chunk_size=64, max_num_seqs=65)
    cfg = _cfg(max_num_batched_tokens=64, prefill_chunk_size=64, max_num_seqs=64)
    assert cfg.max_num_seqs == 64


@pytest.mark.parametrize("kwargs", [{"mp_size": 2, "tp": 4}, {"mp_size": 2, "tp": {"tp_size": 4}},
                                    {"mp_size": 4, "tensor_parallel": 2}])
def test_mp_size_conflicting_with_tp_refused(kwargs: dict) -> None:
    with pytest.raises(ValidationError, match="mp_size"):
        _cfg(**kwargs)


def test_frozen() -> None:
    cfg = EngineConfig()
    with pytest.raises(ValidationError):
        cfg.block_size = 32  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.tensor_parallel.tp_size = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.quant.enabled = True  # type: ignore[misc]
    assert cfg.block_size == 16 and cfg.tp_size == 1


def test_from_file_json_round_trip(tmp_path: Path) -> None:
    cfg = _cfg(model="/ckpt", dtype="bf16", tp=2, quant=True, block_size=32,
                       max_num_batched_tokens=4096, seed=7, kernel_inject=False)
    path = tmp_path / "engine.json"
    path.write_text(cfg.model_dump_json())
    assert EngineConfig.from_file(path) == cfg
    assert EngineConfig.from_file(str(path)) == cfg


def test_cuda_graph_steps() -> None:
    assert EngineConfig().cuda_graph_steps == "all"
    captured = {steps: (EngineConfig(enable_cuda_graph=True, cuda_graph_steps=steps).captures_decode_graphs,
                        EngineConfig(enable_cuda_graph=True, cuda_graph_steps=steps).captures_prefill_graphs)
                for steps in ("all", "decode", "prefill")}
    assert captured == {"all": (True, True), "decode": (True, False), "prefill": (False, True)}
    off = EngineConfig(cuda_graph_steps="prefill")  # without enable_cuda_graph nothing is captured
    assert not off.captures_decode_graphs and not off.captures_prefill_graphs
    with pytest.raises(ValidationError, match="cuda_graph_steps"):
        EngineConfig(cuda_graph_steps="chunks")


def test_from_file_deepspeed_style_json(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"dtype": "fp16", "mp_size": 2, "replace_with_kernel_inject": True,
                                "max_tokens": 1024, "enable_cuda_graph": True}))
    cfg = EngineConfig.from_file(path)
    assert (cfg.dtype, cfg.tp_size, cfg.replace_with_kernel_inject) == ("float16", 2, True)
    assert cfg.max_out_tokens == 1024 and cfg.enable_cuda_graph


def test_from_file_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "engine.yaml"
    path.write_text("dtype: bf16\ntp: 2\nquant:\n  enabled: true\n")
    cfg = EngineConfig.from_file(path)
    assert (cfg.dtype, cfg.tp_size, cfg.quant.enabled) == ("bfloat16", 2, True)


def test_from_file_yaml_without_pyyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = tmp_path / "engine.yml"
    path.write_text("tp: 2\n")
    with pytest.raises(ImportError, match="PyYAML"):
        EngineConfig.from_file(path)


def test_from_file_refusals(tmp_path: Path) -> None:
    bad_suffix = tmp_path / "engine.toml"
    bad_suffix.write_text("")
    with pytest.raises(ValueError, match=r"\.json"):
        EngineConfig.from_file(bad_suffix)
    not_mapping = tmp_path / "list.json"
    not_mapping.write_text("[1, 2]")
    with pytest.raises(TypeError, match="mapping"):
        EngineConfig.from_file(not_mapping)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"tp_sise": 2}')
    with pytest.raises(ValidationError, match="tp_sise"):
        EngineConfig.from_file(unknown)


def test_from_any_inputs(tmp_path: Path) -> None:
    assert EngineConfig.from_any(None) == EngineConfig()
    assert EngineConfig.from_any({"tp": 2}).tp_size == 2
    cfg = _cfg(seed=3)
    assert EngineConfig.from_any(cfg) is cfg
    path = tmp_path / "c.json"
    path.write_text('{"block_size": 8}')
    assert EngineConfig.from_any(path).block_size == 8
    assert EngineConfig.from_any(str(path)).block_size == 8
    with pytest.raises(TypeError):
        EngineConfig.from_any(42)


def test_from_any_overrides_win(tmp_path: Path) -> None:
    base = {"tp": 2, "max_tokens": 100, "seed": 1, "block_size": 32}
    cfg = EngineConfig.from_any(base, tp=4, max_out_tokens=200, seed=5)
    assert (cfg.tp_size, cfg.max_out_tokens, cfg.seed, cfg.block_size) == (4, 200, 5, 32)
    assert EngineConfig.from_any(_cfg(tp=2), mp_size=8).tp_size == 8
    assert EngineConfig.from_any({"mp_size": 2}, tensor_parallel=4).tp_size == 4
    assert EngineConfig.from_any(_cfg(quant=True), dtype="fp16").quant.enabled
    path = tmp_path / "c.json"
    path.write_text('{"token_budget": 4096}')
    assert EngineConfig.from_any(path, chunk_size=4096).prefill_chunk_size == 4096


def test_from_any_override_refusals() -> None:
    with pytest.raises(ValidationError, match="tp_sise"):
        EngineConfig.from_any({}, tp_sise=2)
    with pytest.raises(ValueError, match="repeats"):
        EngineConfig.from_any({}, tp=2, tensor_parallel=2)
    with pytest.raises(ValidationError, match="prefill_chunk_size"):
        EngineConfig.from_any({"chunk_size": 512}, token_budget=256, max_num_seqs=8)


@pytest.mark.parametrize(
    ("dtype", "device_type", "ckpt", "expected"),
    [
        ("auto", "cpu", "bfloat16", "float32"),
        ("auto", "cpu", None, "float32"),
        ("auto", "cuda", "bfloat16", "bfloat16"),
        ("auto", "cuda", "float16", "float16"),
        ("auto", "cuda", "torch.float16", "float16"),
        ("auto", "cuda", None, "float32"),
        ("float16", "cpu", "bfloat16", "float16"),
        ("bf16", "cuda", "float32", "bfloat16"),
    ],
)
def test_resolve_dtype(dtype: str, device_type: str, ckpt: str | None, expected: str) -> None:
    assert _cfg(dtype=dtype).resolve_dtype(device_type, ckpt) == expected


def test_resolve_dtype_refusals() -> None:
    with pytest.raises(ValueError, match="float64"):
        EngineConfig().resolve_dtype("cuda", "float64")
    with pytest.raises(ValueError, match="device_type"):
        EngineConfig().resolve_dtype("cuda:0", None)


@pytest.mark.parametrize(
    ("inject", "device_type", "expected"),
    [
        (None, "cuda", True),
        (None, "cpu", False),
        (True, "cpu", True),
        (True, "cuda", True),
        (False, "cuda", False),
        (False, "cpu", False),
    ],
)
def test_use_kernels(inject: bool | None, device_type: str, expected: bool) -> None:
    assert _cfg(replace_with_kernel_inject=inject).use_kernels(device_type) is expected


def test_use_kernels_unknown_device_refused() -> None:
    with pytest.raises(ValueError, match="device_type"):
        EngineConfig().use_kernels("mps")


HOPPER, AMPERE = (9, 0), (8, 0)


@pytest.mark.parametrize(
    ("pdl", "inject", "device_type", "capability", "expected"),
    [
        (None, None, "cuda", HOPPER, True),
        (None, None, "cuda", (10, 0), True),
        (None, None, "cuda", AMPERE, False),
        (None, False, "cuda", HOPPER, False),  # no Triton kernels: nothing to launch early
        (None, True, "cpu", None, False),
        (False, None, "cuda", HOPPER, False),
        (True, None, "cuda", HOPPER, True),
    ],
)
def test_use_pdl(pdl: bool | None, inject: bool | None, device_type: str, capability: tuple[int, int] | None,
                 expected: bool) -> None:
    assert _cfg(enable_pdl=pdl, replace_with_kernel_inject=inject).use_pdl(device_type, capability) is expected


@pytest.mark.parametrize(
    ("inject", "device_type", "capability"), [(None, "cuda", AMPERE), (False, "cuda", HOPPER), (True, "cpu", None)]
)
def test_pdl_asked_for_where_it_cannot_run_refused(inject: bool | None, device_type: str,
                                                   capability: tuple[int, int] | None) -> None:
    with pytest.raises(ValueError, match="enable_pdl needs the injected kernels"):
        _cfg(enable_pdl=True, replace_with_kernel_inject=inject).use_pdl(device_type, capability)


def test_torch_dtype() -> None:
    assert torch_dtype("float16") is torch.float16
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype(EngineConfig().resolve_dtype("cpu", None)) is torch.float32
    with pytest.raises(ValueError, match="auto"):
        torch_dtype("auto")


def test_module_does_not_import_torch_at_load() -> None:
    code = "import sys, engine.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
