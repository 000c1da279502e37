"""Settings of a prefill or decode worker process (flags and SPLITSERVE_* environment variables)."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.config import EngineConfig


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="local Hugging Face checkpoint folder")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the registry and KV metadata")
    prefix: str = Field("splitserve", description="key prefix in Redis (one cluster per prefix)")
    host: str = Field("127.0.0.1", description="address to bind the gRPC server and the KV receiver to")
    advertise_host: str | None = Field(None, description="address others reach this worker at (default: --host)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = any free port)")
    kv_port: int = Field(0, ge=0, le=65535, description="TCP port of the KV receiver, decode only (0 = any)")
    worker_id: str = Field("", description="unique id in the registry (default: role-hostname-random)")
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between registry heartbeats")
    registry_ttl_s: float = Field(3.0, gt=0, description="a worker silent this long drops out of the registry")
    transfer_timeout_s: float = Field(30.0, gt=0, description="deadline of one KV transfer")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine: EngineConfig = Field(default_factory=EngineConfig)

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"

    def advertised(self, port: int) -> str:
        return f"{self.advertise_host or self.host}:{port}"


_ENGINE_FLAGS = {  # flag -> EngineConfig field
    "dtype": str, "device": str, "block_size": int, "num_kv_blocks": int, "max_num_batched_tokens": int,
    "max_num_seqs": int, "prefill_chunk_size": int, "max_out_tokens": int, "seed": int, "cpu_kv_cache_gib": float,
    "kv_cache_memory_fraction": float,
}


def parse_worker_args(role: str, argv: list[str] | None = None) -> WorkerSettings:
    """Flags override SPLITSERVE_<NAME> environment variables, which override the defaults."""
    parser = argparse.ArgumentParser(prog=f"splitserve {role}-worker", description=f"a {role} worker process")
    for name, field in WorkerSettings.model_fields.items():
        if name == "engine":
            continue
        env = os.environ.get(f"SPLITSERVE_{name.upper()}")
        kind = _flag_type(field.annotation)
        default = kind(env) if env is not None else field.default
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default,
                            required=field.is_required() and env is None,
                            help=f"{field.description or ''} (env SPLITSERVE_{name.upper()}; default: {field.default})")
    for name, kind in _ENGINE_FLAGS.items():
        env = os.environ.get(f"SPLITSERVE_{name.upper()}")
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=kind(env) if env else None,
                            help=f"engine setting {name} (env SPLITSERVE_{name.upper()})")
    args = vars(parser.parse_args(argv))
    engine = {k: args.pop(k) for k in _ENGINE_FLAGS if args.get(k) is not None}
    for k in _ENGINE_FLAGS:
        args.pop(k, None)
    return WorkerSettings(**args, engine=EngineConfig(model=args["model"], **engine))


def _flag_type(annotation: Any) -> Any:
    if annotation in (int, float):
        return annotation
    return str
