"""Prometheus metrics of a worker process (served on --metrics-port when it is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("splitserve_worker_requests_total", "requests handled", ["role", "status"])
PREFILL_TOKENS = Counter("splitserve_prefill_tokens_total", "prompt tokens computed", ["role"])
OUTPUT_TOKENS = Counter("splitserve_output_tokens_total", "tokens generated", ["role"])
KV_BLOCKS_USED = Gauge("splitserve_kv_blocks_used", "KV-cache blocks in use", ["role"])
QUEUE_DEPTH = Gauge("splitserve_queue_depth", "requests waiting to be scheduled", ["role"])
TRANSFER_BYTES = Counter("splitserve_kv_transfer_bytes_total", "KV bytes moved", ["role"])
TRANSFER_SECONDS = Histogram("splitserve_kv_transfer_seconds", "KV transfer time per request", ["role"],
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
TRANSFERS = Counter("splitserve_kv_transfers_total", "KV transfers by outcome", ["role", "outcome"])
TTFT = Histogram("splitserve_worker_ttft_seconds", "arrival to first token on this worker", ["role"])
TPOT = Histogram("splitserve_worker_tpot_seconds", "mean time per output token after the first", ["role"],
                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))


def serve_metrics(port: int) -> None:
    if port:
        start_http_server(port)
