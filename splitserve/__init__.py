"""splitserve: the command line and the small public Python API.

``from splitserve import init_inference, SamplingParams`` loads the engine lazily, so importing
this package (as the gateway does) pulls in no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "init_inference": "engine.engine",
    "Engine": "engine.engine",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
