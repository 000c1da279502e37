"""Shared fixtures: small random checkpoints (cached per session) and transformers as the oracle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Triton picks compiled kernels or its CPU interpreter once, at import: decide before any test imports it.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA exists; elsewhere they are deselected, not silently passed."""
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """make_checkpoint(family, **config overrides) -> folder; identical arguments share one folder."""
    from engine.models.demo import write_checkpoint

    cache: dict[str, Path] = {}

    def make(family: str, seed: int = 0, **overrides: Any) -> Path:
        key = f"{family}-{seed}-{sorted(overrides.items())}"
        if key not in cache:
            cache[key] = write_checkpoint(tmp_path_factory.mktemp(family), family, seed=seed, **overrides)
        return cache[key]

    return make
