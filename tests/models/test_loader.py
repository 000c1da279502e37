"""Loading checkpoint folders: sharded and .bin weights, and a clear refusal for each kind of broken folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.engine import Engine
from engine.models.loader import CheckpointError, weight_files
from engine.models.registry import MODELS, UnsupportedModelError
from engine.request import SamplingParams

PROMPT = [5, 17, 300, 2, 44, 9, 130]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)



def make_engine(model_dir: Any, **overrides: Any) -> Engine:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64)
    return Engine(EngineConfig(**{**cfg, **overrides}))


def greedy_tokens(model_dir: Any) -> list[int]:
    return make_engine(model_dir).generate([PROMPT], GREEDY)[0].token_ids


def config_only(src: Path, dst: Path) -> Path:
    """A folder holding only ``src``'s config.json (the caller adds weights, or not)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def copy_without(src: Path, dst: Path, *drop: str) -> Path:
    """``src`` with its single safetensors file rewritten without the tensors named in ``drop``."""
    tensors = load_file(str(src / "model.safetensors"))
    assert all(name in tensors for name in drop), f"no such tensor among {sorted(tensors)}"
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(config_only(src, dst) / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def llama(make_checkpoint: Any) -> Path:
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def reference_tokens(llama: Path) -> list[int]:
    tokens = greedy_tokens(llama)
    assert len(set(tokens)) > 2, "a degenerate model would hide loading mistakes"
    return tokens


# -- weight formats -------------------------------------------------------------------------------
def test_sharded_safetensors_load_like_the_single_file(llama: Path, reference_tokens: list[int],
                                                       tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert weight_files(tmp_path) == shards
    assert greedy_tokens(tmp_path) == reference_tokens


def test_pytorch_model_bin_loads_like_safetensors(llama: Path, reference_tokens: list[int], tmp_path: Path) -> None:
    folder = config_only(llama, tmp_path / "bin")
    torch.save(load_file(str(llama / "model.safetensors")), folder / "pytorch_model.bin")
    assert weight_files(folder) == [folder / "pytorch_model.bin"]
    assert greedy_tokens(folder) == reference_tokens


def test_sharded_pytorch_model_bin_loads(llama: Path, reference_tokens: list[int], tmp_path: Path) -> None:
    folder = config_only(llama, tmp_path / "bin-sharded")
    tensors = load_file(str(llama / "model.safetensors"))
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in shards.items():
        torch.save({n: tensors[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert greedy_tokens(folder) == reference_tokens


def test_index_naming_a_missing_shard_is_refused(llama: Path, tmp_path: Path) -> None:
    AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        make_engine(tmp_path)
def test_index_without_a_weight_map_is_a_checkpoint_error(llama: Path, tmp_path: Path) -> None:
    folder = copy_without(llama, tmp_path / "c")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        weight_files(folder)


# -- broken folders -------------------------------------------------------------------------------
def test_folder_without_weights_names_the_expected_files(llama: Path, tmp_path: Path) -> None:
    folder = config_only(llama, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights") as e:
        make_engine(folder)
    for expected in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert expected in str(e.value)


def test_folder_without_config_json_is_refused(llama: Path, tmp_path: Path) -> None:
    shutil.copy(llama / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        make_engine(tmp_path)


def test_nonexistent_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        make_engine(tmp_path / "nowhere")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM") as e:
        make_engine(tmp_path)
    assert all(arch in str(e.value) for arch in MODELS)


def test_checkpoint_missing_a_tensor_is_refused(llama: Path, tmp_path: Path) -> None:
    folder = copy_without(llama, tmp_path / "c", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(CheckpointError, match="lacks 1 weights.*model.layers.1.mlp.down_proj.weight"):
        make_engine(folder)


def test_missing_untied_lm_head_is_refused(llama: Path, tmp_path: Path) -> None:
    folder = copy_without(llama, tmp_path / "c", "lm_head.weight")
    with pytest.raises(CheckpointError, match="lacks.*lm_head.weight"):
        make_engine(folder)



@pytest.mark.parametrize("part", ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"])
def test_checkpoint_missing_one_part_of_a_fused_matrix_is_refused(llama: Path, tmp_path: Path, part: str) -> None:
    folder = copy_without(llama, tmp_path / "c", part)
    with pytest.raises(CheckpointError, match="lacks"):
        make_engine(folder)



def test_weights_of_another_shape_than_the_config_are_refused(llama: Path, tmp_path: Path) -> None:
    folder = copy_without(llama, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        make_engine(folder)


# -- context length and rotary settings -----------------------------------------------------------
def test_mistral_sliding_window_caps_the_context(make_checkpoint: Any) -> None:
    folder = make_checkpoint("mistral", sliding_window=16)
    engine = make_engine(folder)
    assert engine.max_model_len == 16
    with pytest.raises(ValueError, match="exceed max_model_len 16"):
        engine.add_request(list(range(1, 11)), SamplingParams(max_new_tokens=7))
    assert not engine.has_unfinished_requests()

    prompt = list(range(1, 11))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert out.token_ids == ref and out.finish_reason == "length"
    assert engine.scheduler.block_manager.num_free_blocks == 64


def test_max_out_tokens_past_the_sliding_window_is_refused(make_checkpoint: Any) -> None:
    with pytest.raises(ValueError, match="max_out_tokens 32 exceeds the model's context of 16"):
        make_engine(make_checkpoint("mistral", sliding_window=16), max_out_tokens=32)


def test_max_out_tokens_caps_max_model_len(llama: Path) -> None:
    engine = make_engine(llama, max_out_tokens=32)
    assert engine.max_model_len == 32 == engine.scheduler.max_model_len
    with pytest.raises(ValueError, match="30 prompt tokens \\+ 3 max new tokens exceed max_model_len 32"):
        engine.add_request(list(range(1, 31)), SamplingParams(max_new_tokens=3))
    out = engine.generate([list(range(1, 31))], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


def test_qwen2_window_that_is_off_does_not_cap_the_context(make_checkpoint: Any) -> None:
    engine = make_engine(make_checkpoint("qwen2", sliding_window=16, use_sliding_window=False))
    assert engine.max_model_len == 1024


def test_yarn_rope_scaling_is_refused_with_the_supported_types(make_checkpoint: Any) -> None:
    folder = make_checkpoint("llama", rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                        original_max_position_embeddings=256))
    with pytest.raises(ValueError, match="'yarn' is not supported") as e:
        make_engine(folder)
    for kind in ("default", "linear", "llama3"):
        assert kind in str(e.value)
