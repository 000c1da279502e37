"""Starts and stops one gateway: the gRPC server (Generation, health, reflection), the registry, metrics."""

from __future__ import annotations

import asyncio

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from gateway import router
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.registry import WorkerRegistry
from gateway.servicer import GenerationServicer
from gateway.settings import GatewaySettings
from gateway.tokenizer import TextTokenizer, load_model_spec
from protos.splitserve.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger("gateway")

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartError(RuntimeError):
    """The gateway could not start (Redis unreachable, port taken); one-line message."""


class GatewayServer:
    """A running gateway. ``port`` is the bound gRPC port (useful with ``settings.port == 0``).

    Health: "" is SERVING while the process serves; "splitserve.v1.Generation" is SERVING only
    while at least one decode worker is alive in the registry.
    """

    def __init__(self, settings: GatewaySettings, server: grpc.aio.Server, port: int, registry: WorkerRegistry,
                 pipeline: Pipeline, health: health_aio.HealthServicer, metrics: GatewayMetrics, redis: Redis) -> None:
        self.settings = settings
        self.port = port
        self.registry = registry
        self.pipeline = pipeline
        self.metrics = metrics
        self._server = server
        self._health = health
        self._redis = redis
        self._generation_status: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def stop(self, grace_s: float | None = 1.0) -> None:
        """Stops taking requests, lets running ones finish for ``grace_s``, then releases everything."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.pipeline.calls.drain(self.settings.cancel_timeout_s)
        await self.registry.close()
        await self._redis.aclose()
        self.metrics.close()
        log.info("gateway stopped", port=self.port)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def start_health(self) -> None:
        await self._health.set("", SERVING)
        await self._health.set(GENERATION_SERVICE, self._changed_status() or NOT_SERVING)
        self.registry.add_listener(self._on_registry_refresh)

    def _on_registry_refresh(self) -> None:
        status = self._changed_status()
        if status is None:
            return
        log.info("generation health", status=health_pb2.HealthCheckResponse.ServingStatus.Name(status))
        task = asyncio.get_running_loop().create_task(self._health.set(GENERATION_SERVICE, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed_status(self) -> int | None:
        """SERVING while a decode worker is alive, else NOT_SERVING; None if that did not change."""
        alive = any(w.role in router.DECODE_ROLES for w in self.registry.workers())
        status = SERVING if alive else NOT_SERVING
        if status == self._generation_status:
            return None
        self._generation_status = status
        return status


async def serve(settings: GatewaySettings) -> GatewayServer:
    """Starts a gateway and returns it once it accepts requests.

    Raises ModelFolderError (bad model folder) or StartError (Redis unreachable, port taken).
    """
    tokenizer = TextTokenizer.from_folder(settings.model)
    spec = load_model_spec(settings.model, settings.max_model_len)
    redis = Redis.from_url(settings.redis_url)
    registry = WorkerRegistry(redis, settings.prefix, settings.worker_ttl_s, settings.registry_refresh_s)
    try:
        await registry.start()
    except Exception as e:
        await redis.aclose()
        raise StartError(f"cannot read the worker registry from Redis at {settings.redis_url}: {e}") from None
    metrics = GatewayMetrics()
    pipeline = Pipeline(settings, tokenizer, spec, registry, metrics)
    server, health = grpc.aio.server(), health_aio.HealthServicer()
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(pipeline), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (GENERATION_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        if settings.metrics_port:
            metrics.serve_http(settings.metrics_port, settings.host)
    except (RuntimeError, OSError) as e:
        await registry.close()
        await redis.aclose()
        raise StartError(f"cannot listen on {settings.host}:{settings.port} / metrics {settings.metrics_port}: {e}") \
            from None
    await server.start()
    gateway = GatewayServer(settings, server, port, registry, pipeline, health, metrics, redis)
    await gateway.start_health()
    log.info("gateway serving", port=port, model=str(settings.model), max_model_len=spec.max_model_len,
             decode_workers=len(registry.live("decode")), prefill_workers=len(registry.live("prefill")))
    return gateway
