"""kvtransfer depends on the standard library, torch and redis only; the transport registry."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import kvtransfer
from kvtransfer import LocalTransport, TcpTransport, make_transport

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"torch", "redis", "kvtransfer"}
OURS = {"engine", "kernels", "protos", "tokenization", "gateway", "prefill_worker", "decode_worker", "worker_common",
        "splitserve"}  # fmt: skip


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: use absolute imports")
    return roots


def test_sources_import_only_stdlib_torch_and_redis() -> None:
    files = sorted((ROOT / "kvtransfer").rglob("*.py"))
    assert len(files) >= 8
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) - ALLOWED - set(sys.stdlib_module_names)) for f in files}
    assert not {f: b for f, b in bad.items() if b}


def test_importing_kvtransfer_loads_nothing_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh import (ours unloaded first, restored after; torch stays loaded, so this is fast)."""
    for name in list(sys.modules):
        if name.split(".")[0] in OURS | {"kvtransfer"}:
            monkeypatch.delitem(sys.modules, name)
    importlib.import_module("kvtransfer")
    assert "kvtransfer.tcp" in sys.modules
    assert sorted(m for m in sys.modules if m.split(".")[0] in OURS) == []


def test_make_transport() -> None:
    assert isinstance(make_transport("tcp", port=0), TcpTransport)
    assert isinstance(make_transport("local", name="x"), LocalTransport)
    with pytest.raises(ValueError, match="unknown KV transport 'nccl'; known: local, tcp"):
        make_transport("nccl")


def test_public_names() -> None:
    for name in kvtransfer.__all__:
        assert hasattr(kvtransfer, name), name
