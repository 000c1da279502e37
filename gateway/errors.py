"""GatewayError: how any part of the gateway ends a request with a gRPC status and a message for the client."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """Ends a request with status ``code``; ``message`` says what happened or what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
