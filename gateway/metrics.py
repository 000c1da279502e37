"""Prometheus metrics of one gateway, in its own CollectorRegistry (several gateways may share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class GatewayMetrics:
    """Request outcomes, latencies (seconds), in-flight requests, where prompt tokens were computed, KV transfers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitserve_gateway_requests", "Requests by final gRPC status code", ["code"],
                                registry=r)
        self.ttft = Histogram("splitserve_gateway_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S,
                              registry=r)
        self.tpot = Histogram("splitserve_gateway_tpot_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("splitserve_gateway_e2e_seconds", "Request latency, receipt to last token",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inflight = Gauge("splitserve_gateway_inflight_requests", "Requests in flight", registry=r)
        self.prefill_tokens = Counter("splitserve_gateway_prefill_tokens", "Prompt tokens computed, by worker role",
                                      ["role"], registry=r)
        self.transfer_bytes = Counter("splitserve_gateway_kv_transfer_bytes", "KV bytes moved prefill -> decode",
                                      registry=r)
        self.transfer_seconds = Counter("splitserve_gateway_kv_transfer_seconds", "Time spent in KV transfers",
                                        registry=r)
        self.retries = Counter("splitserve_gateway_decode_retries", "Decode attempts moved to another worker",
                               registry=r)
        self.abandoned_transfers = Counter("splitserve_gateway_abandoned_transfers",
                                           "Prefills that failed, so the decode worker recomputed", registry=r)
        self._http: Any = None

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Serves /metrics on ``port`` from a background thread."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
