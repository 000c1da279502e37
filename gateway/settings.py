"""GatewaySettings: every gateway option, validated once, from flags or from a launcher in-process."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PREFIX = "splitserve"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class GatewaySettings(BaseModel):
    """Options of one gateway process. Sizes are in tokens, times in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(description="model folder: tokenizer.json and config.json are read")
    redis_url: str = DEFAULT_REDIS_URL
    host: str = "0.0.0.0"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="Redis key prefix of the registry")
    chunk_size: int = Field(512, ge=1, description="prefill chunk size C")
    max_prefill_chunks: int = Field(0, ge=0, description="k: the prefill group computes at most k*C tokens; 0 = all")
    short_prompt_threshold: int = Field(32, ge=0, description="prompts shorter than this skip the prefill group")
    max_inflight: int = Field(256, ge=1, description="requests in flight before RESOURCE_EXHAUSTED")
    max_model_len: int | None = Field(None, ge=1, description="caps the model's context")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = no metrics endpoint")
    log_format: Literal["console", "json"] = "console"
    retries: int = Field(2, ge=0, description="decode attempts after the first when a decode worker dies")
    worker_ttl_s: float = Field(3.0, gt=0, description="a registry entry older than this is dead")
    registry_refresh_s: float = Field(0.5, gt=0, description="how often the registry is re-read from Redis")
    cancel_timeout_s: float = Field(1.0, gt=0, description="deadline of Cancel/AbandonTransfer calls to workers")


class SettingsError(ValueError):
    """A bad flag or value; its message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SettingsError(message)


_FLAGS = (
    "model", "redis_url", "host", "port", "prefix", "chunk_size", "max_prefill_chunks", "short_prompt_threshold",
    "max_inflight", "max_model_len", "metrics_port", "log_format", "retries", "worker_ttl_s", "registry_refresh_s",
)


def parse_args(argv: Sequence[str] | None = None) -> GatewaySettings:
    """Flags -> GatewaySettings; raises SettingsError with a one-line message on bad input."""
    parser = _Parser(prog="python -m gateway", description="splitserve gateway: the public gRPC endpoint")
    for name in _FLAGS:
        field = GatewaySettings.model_fields[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, required=name == "model",
                            help=field.description)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return GatewaySettings(**args)
    except ValidationError as e:
        err = e.errors()[0]
        where = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "settings"
        raise SettingsError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None
