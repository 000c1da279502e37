"""The gateway: the only public endpoint. Validates, tokenizes, routes to prefill and decode workers, streams.

Start one in-process with ``await serve(GatewaySettings(model=...))`` or as ``python -m gateway``.
"""

from __future__ import annotations

from gateway.server import GatewayServer, StartError, serve
from gateway.settings import GatewaySettings

__all__ = ["GatewayServer", "GatewaySettings", "StartError", "serve"]
