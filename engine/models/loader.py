"""Reads a local HF checkpoint folder: its config and its weights (safetensors, sharded or not, or .bin)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_FILES = "model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """The folder is not a checkpoint we can load; the message says why."""


def load_hf_config(model_dir: str | Path) -> Any:
    """The folder's config.json through transformers (normalises defaults and rope fields)."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint folder")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def weight_files(model_dir: str | Path) -> list[Path]:
    path = Path(model_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{str(path)!r} has no weights: expected {WEIGHT_FILES}")


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one file open at a time."""
    from safetensors import safe_open

    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, int, torch.Tensor]]) -> None:
    """Copy each (our parameter name, shard index, full tensor) into the model.

    Parameters with a ``weight_loader`` slice their tensor-parallel part (and their shard of a
    fused matrix) themselves. Every parameter must be written, or the checkpoint is incomplete.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[int, int]] = set()  # (id(param), shard): tied parameters count once
    for name, shard, tensor in weights:
        param = params.get(name)
        if param is None:
            continue  # buffers of other implementations (e.g. attn.masked_bias), heads we tie
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is not None:
                loader(param, tensor.to(param.dtype), shard)
            elif param.shape != tensor.shape:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None
        loaded.add((id(param), shard))
    _check_complete(params, loaded)


def _check_complete(params: dict[str, nn.Parameter], loaded: set[tuple[int, int]]) -> None:
    """Every shard of every parameter (q, k and v of a fused qkv, say) must have been written."""
    missing = [
        n if getattr(p, "num_shards", 1) == 1 else f"{n} (shard {s})"
        for n, p in params.items()
        for s in range(getattr(p, "num_shards", 1))
        if (id(p), s) not in loaded
    ]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:4])}")
