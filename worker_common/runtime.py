"""One worker process: engine + engine loop + gRPC server + registry heartbeat + KV transport."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
import redis.asyncio as aioredis
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.engine import Engine
from engine.request import SamplingParams
from kvtransfer import KVLayout, RedisMetadataStore, make_transport
from protos.splitserve.internal.v1 import worker_pb2
from protos.splitserve.v1 import generation_pb2
from splitserve.logs import configure_logging
from worker_common import metrics
from worker_common.engine_loop import EngineLoop
from worker_common.registration import Registration
from worker_common.settings import WorkerSettings, parse_worker_args

log = structlog.get_logger(__name__)


def sampling_from_proto(p: generation_pb2.SamplingParams) -> SamplingParams:
    """The gateway validated these; defaults for unset optional fields match the public API's."""
    return SamplingParams(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else 16,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


class WorkerRuntime:
    """Everything a worker servicer needs; ``start`` brings it up, ``stop`` takes it down cleanly."""

    def __init__(self, settings: WorkerSettings, role: str) -> None:
        self.settings, self.role = settings, role
        self.worker_id = settings.resolved_worker_id(role)
        self.engine = Engine(settings.engine, detokenize=False)  # the gateway makes the text
        self.loop = EngineLoop(self.engine)
        self.redis = aioredis.from_url(settings.redis_url)
        self.metadata = RedisMetadataStore(self.redis, settings.prefix)
        self.transport = make_transport("tcp", host=settings.host, port=settings.kv_port)
        layout = self.engine.runner.kv_cache.layout
        self.kv_layout = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim,
                                  str(layout.dtype).removeprefix("torch."))
        self.address = ""
        self.kv_endpoint = ""
        self.server: grpc.aio.Server | None = None
        self.registration: Registration | None = None

    def info(self) -> worker_pb2.WorkerInfo:
        sched = self.engine.scheduler
        bm = sched.block_manager
        metrics.KV_BLOCKS_USED.labels(self.role).set(bm.num_used_blocks)
        metrics.QUEUE_DEPTH.labels(self.role).set(sched.num_waiting)
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=self.role, address=self.address, kv_endpoint=self.kv_endpoint,
            model=self.settings.model, max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.hf_config.vocab_size,
            load=worker_pb2.WorkerLoad(
                num_kv_blocks=bm.num_blocks, used_kv_blocks=bm.num_used_blocks, num_running=sched.num_running,
                num_waiting=sched.num_waiting + sched.num_waiting_for_kv, queued_tokens=sched.num_queued_tokens,
            ),
        )

    async def start(self, add_servicer: Callable[[grpc.aio.Server], None], kv_server: bool) -> None:
        await self.redis.ping()
        self.server = grpc.aio.server()
        add_servicer(self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        self.address = self.settings.advertised(port)
        if kv_server:
            endpoint = await self.transport.start_server()
            self.kv_endpoint = self.settings.advertised(int(endpoint.rsplit(":", 1)[1]))
        await self.server.start()
        self.loop.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.registration = Registration(self.redis, self.settings.prefix, self.info,
                                         self.settings.heartbeat_s, self.settings.registry_ttl_s)
        await self.registration.start()
        metrics.serve_metrics(self.settings.metrics_port)
        log.info("worker_started", role=self.role, worker_id=self.worker_id, address=self.address,
                 kv_endpoint=self.kv_endpoint, kv_blocks=self.engine.scheduler.block_manager.num_blocks)

    async def stop(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.loop.stop()
        await self.transport.close()
        await self.redis.aclose()
        log.info("worker_stopped", worker_id=self.worker_id)


def first_token_params(sampling: SamplingParams) -> SamplingParams:
    """The prefill side samples one token, exactly as the decode side would have (same seed and index)."""
    return replace(sampling, max_new_tokens=1, stop=())


def run_worker(role: str, make_servicer: Callable[[WorkerRuntime], Any], kv_server: bool,
               argv: list[str] | None = None) -> int:
    """Parse flags (exit 2 on bad ones), then serve until SIGINT/SIGTERM."""
    try:
        settings = parse_worker_args(role, argv)
    except ValueError as e:
        print(f"splitserve {role}-worker: error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(_serve(settings, role, make_servicer, kv_server))


async def _serve(settings: WorkerSettings, role: str, make_servicer: Callable[[WorkerRuntime], Any],
                 kv_server: bool) -> int:
    try:
        runtime = WorkerRuntime(settings, role)
    except ValueError as e:
        print(f"splitserve {role}-worker: error: {e}", file=sys.stderr)
        return 2
    servicer = make_servicer(runtime)
    await runtime.start(servicer.add_to_server, kv_server)
    stopped = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopped.set)
    loop_task = runtime.loop.task
    await asyncio.wait([asyncio.create_task(stopped.wait()), loop_task], return_when=asyncio.FIRST_COMPLETED)
    failed = loop_task.done() and not loop_task.cancelled() and loop_task.exception() is not None
    await runtime.stop()
    return 1 if failed else 0
