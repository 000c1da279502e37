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
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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
    loaded: set[str] = set()
    for name, shard, tensor in weights:
        param = params.get(name)
        if param is None:
            continue  # buffers of other implementations (e.g. attn.masked_bias), heads we tie
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor.to(param.dtype), shard)
        elif param.shape != tensor.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        else:
            param.data.copy_(tensor)
        loaded.add(name)
    _check_complete(model, params, loaded)


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    loaded_ids = {id(params[n]) for n in loaded}
    missing = [n for n, p in params.items() if id(p) not in loaded_ids]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:4])}")
