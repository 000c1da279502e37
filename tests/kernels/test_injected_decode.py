"""The engine with every Triton kernel injected (interpreter on CPU) generates transformers' greedy tokens,
one sequence at a time: its decode steps have one row, so every projection runs the one-row GEMV; the
prompt runs through the multi-row paths. On a GPU (``-m gpu``) the same check runs compiled, with and without
programmatic dependent launch (Hopper+)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import SamplingParams

NEW = 6
PDL_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize(("device", "pdl"), [
    ("cpu", None),
    pytest.param("cuda", False, marks=pytest.mark.gpu, id="cuda-serial"),
    pytest.param("cuda", True, id="cuda-pdl", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not PDL_GPU, reason="PDL needs a GPU of compute capability 9.0+")]),
])
@pytest.mark.parametrize(("family", "overrides"), [
    ("llama", {}),
    ("qwen2", {}),  # a bias on q, k and v: rotary after the bias in the projection's epilogue
    ("gpt2", {}),  # LayerNorm + GELU, biases everywhere
])
def test_one_sequence_with_kernels_matches_transformers(
    family: str, overrides: dict, device: str, pdl: bool | None, make_checkpoint: Any
) -> None:
    model_dir = make_checkpoint(family, **overrides)
    eng = Engine(EngineConfig(model=str(model_dir), dtype="float32", device=device, block_size=16, num_kv_blocks=16,
                              max_num_seqs=2, replace_with_kernel_inject=True, enable_pdl=pdl))
    assert eng.runner.pdl is bool(pdl)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.randint(1, 500, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    [out] = eng.generate([prompt], SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref
