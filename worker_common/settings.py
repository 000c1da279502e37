"""WorkerSettings: every option of a prefill or decode worker, its engine's included, from flags, SPLITSERVE_*
variables and a --config file (precedence in that order, then the defaults)."""

from __future__ import annotations

import argparse
import socket
import uuid
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from engine.config import EngineConfig
from splitserve.settings_cli import ProcessSettings, SettingsError, build_parser, load_settings

__all__ = ["ENGINE_SETTINGS", "SettingsError", "WorkerSettings", "parse_worker_args", "worker_parser"]

ENGINE_SETTINGS = (
    "dtype", "device", "block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "prefill_chunk_size",
    "max_out_tokens", "seed", "cpu_kv_cache_gib", "kv_cache_memory_fraction", "replace_with_kernel_inject",
    "enable_cuda_graph", "cuda_graph_steps", "enable_pdl", "async_scheduling",
)
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class WorkerSettings(ProcessSettings):
    """One worker process. The engine settings keep EngineConfig's names (not its DeepSpeed aliases) and
    defaults; ``engine`` is the EngineConfig they make, validated with the rest at construction."""

    model: str = Field(description="local Hugging Face checkpoint folder")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the registry and KV metadata")
    prefix: str = Field("splitserve", min_length=1, description="key prefix in Redis, one cluster per prefix")
    host: str = Field("127.0.0.1", description="address to bind the gRPC server and the KV receiver to")
    advertise_host: str | None = Field(
        None, description="address others reach this worker at; none = --host, or this machine's hostname "
        "when --host binds every interface (as in a container)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 = any free port")
    kv_port: int = Field(0, ge=0, le=65535, description="TCP port of the KV receiver, decode only; 0 = any free port")
    worker_id: str = Field("", description="unique id in the registry; empty = role-hostname-random")
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between registry heartbeats")
    registry_ttl_s: float = Field(3.0, gt=0, description="a worker silent this long drops out of the registry")
    transfer_timeout_s: float = Field(30.0, gt=0, description="deadline of one KV transfer, in seconds")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off")
    log_format: Literal["console", "json"] = Field("console", description="log lines on stderr")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")

    dtype: str = Field("auto", description="auto | float32 | float16 | bfloat16 or an alias such as fp16; auto = the "
                       "checkpoint's on CUDA, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when there is a GPU")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block, a power of two")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV-cache blocks; none = sized from memory")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one engine step")
    max_num_seqs: int = Field(256, ge=1, description="most requests in one step")
    prefill_chunk_size: int = Field(512, ge=1, description="most prompt tokens of one request in one step")
    max_out_tokens: int | None = Field(None, ge=1, description="context cap, prompt + output; none = the model's")
    seed: int = Field(0, description="seed of requests that bring none")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache GiB on CPU when num_kv_blocks is none")
    kv_cache_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of free GPU memory for the KV cache when num_kv_blocks is none")
    replace_with_kernel_inject: bool | None = Field(
        None, description="fused Triton kernels; none = on for CUDA, off for CPU")
    enable_cuda_graph: bool = Field(
        False, description="CUDA graphs for decode steps and lone prompt chunks (needs CUDA)")
    cuda_graph_steps: Literal["all", "decode", "prefill"] = Field(
        "all", description="with enable_cuda_graph, the steps that replay graphs: all, decode or prefill")
    enable_pdl: bool | None = Field(
        None, description="programmatic dependent launch of the kernels; none = on for compute capability 9.0+")
    async_scheduling: bool | None = Field(
        None, description="queue the next decode step before reading this one's tokens; none = on for CUDA")

    _engine: EngineConfig = PrivateAttr()

    @model_validator(mode="after")
    def _make_engine_config(self) -> WorkerSettings:
        self._engine = EngineConfig(model=self.model, **{name: getattr(self, name) for name in ENGINE_SETTINGS})
        return self

    @property
    def engine(self) -> EngineConfig:
        return self._engine

    def resolved_worker_id(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"

    def advertised(self, port: int) -> str:
        """host:port that others dial: advertise_host, else host, else (host binds everything) the hostname."""
        host = self.advertise_host or (socket.gethostname() if self.host in _WILDCARD_HOSTS else self.host)
        return f"{host}:{port}"


def worker_parser(role: str) -> argparse.ArgumentParser:
    """The flags of `splitserve {role}-worker`: one per WorkerSettings field, plus --config FILE."""
    engine = list(ENGINE_SETTINGS)
    worker = [name for name in WorkerSettings.model_fields if name not in engine]
    return build_parser(WorkerSettings, f"splitserve {role}-worker", f"a {role} worker process",
                        [("worker settings", worker), ("engine settings (EngineConfig)", engine)])


def parse_worker_args(role: str, argv: list[str] | None = None) -> WorkerSettings:
    """Flags > SPLITSERVE_<NAME> environment variables > --config file > defaults; SettingsError (a ValueError,
    one line) on bad input."""
    return load_settings(WorkerSettings, worker_parser(role), argv)
