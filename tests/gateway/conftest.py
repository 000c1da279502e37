"""Gateway test fixtures: the test checkpoint's folder, `async def` tests run with asyncio.run, and the
fakes module registered as `gateway_fakes` (tests/ has no packages, so a bare `fakes` could collide)."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest

ASYNC_TEST_TIMEOUT_S = 30.0

_spec = importlib.util.spec_from_file_location("gateway_fakes", Path(__file__).with_name("fakes.py"))
assert _spec is not None and _spec.loader is not None
fakes = importlib.util.module_from_spec(_spec)
sys.modules["gateway_fakes"] = fakes
_spec.loader.exec_module(fakes)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Runs `async def` tests in a fresh event loop, failing them after ASYNC_TEST_TIMEOUT_S."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), ASYNC_TEST_TIMEOUT_S))
    return True


@pytest.fixture(scope="session")
def model_dir(make_checkpoint: Any) -> Path:
    return make_checkpoint("llama")


@pytest.fixture(scope="session")
def vocab_size(model_dir: Path) -> int:
    """Tokens the test tokenizer knows (the fake model stays inside them, so every token has text)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
