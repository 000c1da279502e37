"""DESIGN.md's import table, enforced: each package imports only what its row allows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {
    "engine", "tokenization", "kernels", "worker_common", "kvtransfer", "protos", "gateway", "prefill_worker",
    "decode_worker", "splitserve",
}

FORBIDDEN = {
    "gateway": {"torch", "engine", "kernels", "kvtransfer", "prefill_worker", "decode_worker", "worker_common",
                "transformers"},
    "worker_common": {"gateway", "prefill_worker", "decode_worker"},
    "prefill_worker": {"decode_worker", "gateway"},
    "decode_worker": {"prefill_worker", "gateway"},
    "engine": {"kvtransfer", "protos", "grpc", "redis", "gateway", "prefill_worker", "decode_worker", "worker_common"},
    "kernels": OURS - {"kernels"},
    "tokenization": OURS - {"tokenization"} | {"torch", "transformers"},
    "kvtransfer": {"engine", "kernels", "protos", "gateway", "prefill_worker", "decode_worker", "worker_common"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_design(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    if package in {"engine", "kernels"}:
        assert files, f"{package}/ should exist"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    assert not {f: b for f, b in bad.items() if b}


PURE = ["engine.scheduler", "engine.block_manager", "engine.request", "tokenization.detokenizer", "splitserve"]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_not_load_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
